"""Transformer layers shared by the autoregressive flow and the AR prior.

Pre-LayerNorm blocks (attention + MLP), stacked with `nn.scan` so that
compile time does not grow with depth. Attention supports two modes:

* full: `x [B, T, D]` -> `[B, T, D]`, causal or bidirectional; it also
  returns the keys/values `[B, T, H, Dh]` so a caller can prefill a cache;
* cached step: `x [B, 1, D]` at position `pos` with an explicit cache
  `(k, v)`, each `[B, T_max, H, Dh]`; returns the updated cache.

Caches are explicit arrays (not a Flax 'cache' collection) so that sampling
code can keep several of them (conditional / unconditional streams for
guidance) and stay purely functional.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`,
`layers`); `farmer_jax.sharding` maps them onto the device mesh.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = Tuple[jax.Array, jax.Array]
Dtype = Any

# Attention logits of masked positions. Finite so a fully masked row (never
# produced here) could not create NaNs.
_MASK_VALUE = -1e9


def logical_param(module: nn.Module, name: str, init_fn, shape, axes):
  """A float32 parameter annotated with logical axis names."""
  return module.param(
      name, nn.with_logical_partitioning(init_fn, axes), shape, jnp.float32)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with logically-named scale and bias."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = logical_param(self, "scale", nn.initializers.ones, (d,), ("embed",))
    bias = logical_param(self, "bias", nn.initializers.zeros, (d,), ("embed",))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias
    return y.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head dot-product self-attention with an optional explicit cache.

  Attributes:
    num_heads: number of heads; the width must divide by it.
    causal: mask future positions (full mode). Cached mode is always causal.
    dtype: compute dtype of the projections and attention.
  """
  num_heads: int
  causal: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, pos=None):
    _, t, d = x.shape
    h = self.num_heads
    dh = d // h
    w_qkv = logical_param(self, "qkv", nn.initializers.normal(d ** -0.5),
                          (d, 3, h, dh), ("embed", None, "heads", "kv"))
    w_out = logical_param(self, "out", nn.initializers.normal(d ** -0.5),
                          (h, dh, d), ("heads", "kv", "embed"))
    qkv = jnp.einsum("btd,dchk->cbthk", x.astype(self.dtype),
                     w_qkv.astype(self.dtype))
    q, k, v = qkv[0], qkv[1], qkv[2]
    if cache is None:
      keys, values = k, v
      q_pos = jnp.arange(t)
      k_pos = jnp.arange(t)
      mask = (k_pos[None, :] <= q_pos[:, None]) if self.causal else None
      new_cache = (k, v)
    else:
      k_cache, v_cache = cache
      keys = jax.lax.dynamic_update_slice(
          k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
      values = jax.lax.dynamic_update_slice(
          v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
      mask = (jnp.arange(keys.shape[1]) <= pos)[None, :]
      new_cache = (keys, values)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, keys.astype(self.dtype))
    logits = logits.astype(jnp.float32) * dh ** -0.5
    if mask is not None:
      logits = jnp.where(mask[None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, values.astype(self.dtype))
    out = jnp.einsum("bqhk,hkd->bqd", out, w_out.astype(self.dtype))
    return out, new_cache


class Mlp(nn.Module):
  """Two-layer GELU MLP, `d -> ratio * d -> d`."""
  ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    w1 = logical_param(self, "wi", init, (d, self.ratio * d), ("embed", "mlp"))
    b1 = logical_param(self, "bi", nn.initializers.zeros, (self.ratio * d,),
                       ("mlp",))
    w2 = logical_param(self, "wo", init, (self.ratio * d, d), ("mlp", "embed"))
    b2 = logical_param(self, "bo", nn.initializers.zeros, (d,), ("embed",))
    y = jnp.dot(x.astype(self.dtype), w1.astype(self.dtype)) + b1.astype(
        self.dtype)
    y = nn.with_logical_constraint(nn.gelu(y), ("batch", "length", "mlp"))
    return jnp.dot(y, w2.astype(self.dtype)) + b2.astype(self.dtype)


class Layer(nn.Module):
  """One pre-LN transformer layer; the body of the `nn.scan` in Transformer.

  Call signature follows `nn.scan`: `(carry, *xs) -> (carry, ys)` with the
  activations as carry and this layer's cache slice as the scanned input.
  """
  num_heads: int
  mlp_ratio: int
  causal: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache: Optional[Cache], pos):
    y, new_cache = Attention(self.num_heads, self.causal, self.dtype,
                             name="attn")(LayerNorm(self.dtype)(x), cache, pos)
    x = x + y
    x = x + Mlp(self.mlp_ratio, self.dtype, name="mlp")(LayerNorm(self.dtype)(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class Transformer(nn.Module):
  """A stack of identical layers under `nn.scan` plus a final LayerNorm.

  `__call__(x [B, T, D], cache=None, pos=None) -> (y [B, T, D], kv)`, where
  in full mode `kv` are the per-layer keys/values `[L, B, T, H, Dh]` and in
  cached mode (cache given, `T == 1`) the updated cache of the same layout.
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int
  causal: bool
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, pos=None):
    layer = nn.remat(Layer, prevent_cse=False) if self.remat else Layer
    stack = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x = nn.with_logical_constraint(x.astype(self.dtype),
                                   ("batch", "length", "embed"))
    x, kv = stack(self.num_heads, self.mlp_ratio, self.causal, self.dtype,
                  name="layers")(x, cache, pos)
    return LayerNorm(self.dtype, name="norm")(x), kv


def init_cache(num_layers: int, batch: int, length: int, width: int,
               num_heads: int, dtype=jnp.float32) -> Cache:
  """An empty KV cache `(k, v)`, each `[L, B, length, H, Dh]`."""
  shape = (num_layers, batch, length, num_heads, width // num_heads)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
