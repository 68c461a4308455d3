"""Transformer layers shared by the autoregressive flow and the AR prior.

Pre-LayerNorm blocks (attention + MLP), stacked with `nn.scan` so that
compile time does not grow with depth. Attention supports two modes:

* full: `x [B, T, D]` -> `[B, T, D]`, causal or bidirectional; it also
  returns the keys/values `[B, T, H, Dh]` so a caller can prefill a cache;
* cached step: `x [B, t, D]` at positions `pos .. pos + t - 1` with an
  explicit cache `(k, v)`, each `[B, H, T_max, Dh]` (head-major), of which
  positions `< pos` are read; returns the new tokens' keys/values
  `[B, t, H, Dh]` (the caller writes them into its cache).

Caches are explicit arrays (not a Flax 'cache' collection) so that sampling
code can keep several of them (conditional / unconditional streams for
guidance) and stay purely functional.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`,
`layers`); `farmer_jax.sharding` maps them onto the device mesh.
"""
import contextlib
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = Tuple[jax.Array, jax.Array]
Dtype = Any

# `config.model.matmul_precision`: what every matmul of the model asks of
# the backend (`jax.lax.Precision` names). 'default' lets it choose: on a
# GPU XLA rounds float32 operands to TF32, on a TPU to one bfloat16 pass,
# and the exact inverse then misses by 0.05-0.08 where 'highest' misses by
# 3e-5 (docs/benchmarks.md, "GPU precision"). 'high' is three bf16 passes on a TPU; on a GPU
# XLA may still use TF32 for it, so only 'highest' is float32 there. On a
# CPU the three are the same. A run may change it when it resumes or is
# restored (config_lib.RUNTIME_MODEL_KEYS; `--matmul_precision`).
MATMUL_PRECISIONS = ("default", "high", "highest")


def precision(name: str) -> Optional[str]:
  """A `MATMUL_PRECISIONS` name -> the `precision=` of a dot (None: default)."""
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"config.model.matmul_precision={name!r}: use one of "
                     f"{MATMUL_PRECISIONS}.")
  return None if name == "default" else name


def precision_scope(name: Optional[str]):
  """The dots traced inside use `name` (None: the process default)."""
  return (jax.default_matmul_precision(name) if name
          else contextlib.nullcontext())

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

  Full mode goes through `jax.nn.dot_product_attention` (causal masking by
  `is_causal`: no mask tensor is built here), so `implementation='cudnn'`
  gives cuDNN's fused attention on GPU; `'xla'` (the default) works
  everywhere; `None` lets JAX choose. A cached step (one token at a time
  when sampling) uses `cached_attention`. Logits and softmax are float32
  whatever the activation dtype.

  Attributes:
    num_heads: number of heads; the width must divide by it.
    causal: mask future positions (full mode). Cached mode is always causal.
    dtype: compute dtype of the projections and attention.
    implementation: `jax.nn.dot_product_attention`'s `implementation`.
    precision: of every matmul here (`precision()`; None: the default).
  """
  num_heads: int
  causal: bool
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = "xla"
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, pos=None,
               return_kv: bool = False):
    # The scope reaches the dots inside dot_product_attention too.
    with precision_scope(self.precision):
      return self._attend(x, cache, pos, return_kv)

  def _attend(self, x, cache, pos, return_kv):
    d = x.shape[-1]
    h = self.num_heads
    dh = d // h
    w_qkv = logical_param(self, "qkv", nn.initializers.normal(d ** -0.5),
                          (d, 3, h, dh), ("embed", None, "heads", "kv"))
    w_out = logical_param(self, "out", nn.initializers.normal(d ** -0.5),
                          (h, dh, d), ("heads", "kv", "embed"))
    x = x.astype(self.dtype)
    # One projection per q/k/v straight into [B, T, H, Dh] (no [3, ...]
    # intermediate to transpose).
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, w_qkv[:, i].astype(self.dtype))
               for i in range(3))
    if cache is None:
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=self.causal, implementation=self.implementation)
      new_kv = (k, v) if return_kv else None
    else:
      k_cache, v_cache = cache
      new_kv = (k.astype(k_cache.dtype), v.astype(v_cache.dtype))
      out = cached_attention(q, k_cache.astype(self.dtype),
                             v_cache.astype(self.dtype), k, v, pos)
    out = jnp.einsum("bqhk,hkd->bqd", out, w_out.astype(self.dtype))
    return out, new_kv


def cached_attention(q, k_cache, v_cache, k_new, v_new, pos):
  """Causal attention of `t` new tokens at `pos ..` over a cache and
  themselves, without writing them into the cache first.

  Args:
    q, k_new, v_new: the new tokens' `[B, t, H, Dh]`.
    k_cache, v_cache: `[B, H, T, Dh]` (head-major: the scores are a batched
      matmul over `(B, H)` with no transposed copy of the cache); positions
      `>= pos` are ignored.
    pos: the first new token's position (traced).

  Returns:
    `[B, t, H, Dh]`. Logits and softmax in float32.
  """
  t, dh = q.shape[1], q.shape[-1]
  f32 = jnp.float32
  scale = dh ** -0.5
  old = jnp.einsum("bqhd,bhkd->bhqk", q, k_cache,
                   preferred_element_type=f32) * scale
  old = jnp.where(jnp.arange(k_cache.shape[2]) < pos, old, -jnp.inf)
  new = jnp.einsum("bqhd,bkhd->bhqk", q, k_new,
                   preferred_element_type=f32) * scale
  new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new, -jnp.inf)
  p = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
  p = p.astype(q.dtype)
  # Both halves summed in float32 and rounded once, as one matmul over all
  # keys would be (bf16 rounding each half measurably breaks the inverse).
  out = (jnp.einsum("bhqk,bhkd->bqhd", p[..., :-t], v_cache,
                    preferred_element_type=f32)
         + jnp.einsum("bhqk,bkhd->bqhd", p[..., -t:], v_new,
                      preferred_element_type=f32))
  return out.astype(q.dtype)


class Mlp(nn.Module):
  """Two-layer GELU MLP, `d -> ratio * d -> d`."""
  ratio: int
  dtype: Dtype = jnp.float32
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    w1 = logical_param(self, "wi", init, (d, self.ratio * d), ("embed", "mlp"))
    b1 = logical_param(self, "bi", nn.initializers.zeros, (self.ratio * d,),
                       ("mlp",))
    w2 = logical_param(self, "wo", init, (self.ratio * d, d), ("mlp", "embed"))
    b2 = logical_param(self, "bo", nn.initializers.zeros, (d,), ("embed",))
    y = jnp.dot(x.astype(self.dtype), w1.astype(self.dtype),
                precision=self.precision) + b1.astype(self.dtype)
    y = nn.with_logical_constraint(nn.gelu(y), ("batch", "length", "mlp"))
    return jnp.dot(y, w2.astype(self.dtype),
                   precision=self.precision) + b2.astype(self.dtype)


class Layer(nn.Module):
  """One pre-LN transformer layer; the body of the `nn.scan` in Transformer.

  Call signature follows `nn.scan`: `(carry, *xs) -> (carry, ys)` with the
  activations as carry, this layer's cache slice as the scanned input and
  its keys/values (all of them, or in cached mode the new tokens') as ys.
  """
  num_heads: int
  mlp_ratio: int
  causal: bool
  dtype: Dtype = jnp.float32
  attention: Optional[str] = "xla"
  return_kv: bool = False
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, cache: Optional[Cache], pos):
    y, new_kv = Attention(self.num_heads, self.causal, self.dtype,
                          self.attention, self.precision, name="attn")(
                              LayerNorm(self.dtype)(x), cache, pos,
                              self.return_kv)
    x = x + y
    x = x + Mlp(self.mlp_ratio, self.dtype, self.precision,
                name="mlp")(LayerNorm(self.dtype)(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_kv


# `config.model.remat` by name: what the backward pass may keep from the
# forward pass of a layer (jax.checkpoint_policies); 'none' keeps everything.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat) -> Optional[str]:
  """`config.model.remat` -> a `REMAT_POLICIES` name, or None for no remat.

  Booleans are accepted too, as a run's saved config may hold one
  (True = 'full').
  """
  if remat is True:
    return "full"
  if remat is False or remat is None or remat == "none":
    return None
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r}: use one of "
                     f"{sorted(REMAT_POLICIES)}.")
  return remat


class Transformer(nn.Module):
  """A stack of identical layers under `nn.scan` plus a final LayerNorm.

  `__call__(x [B, T, D], cache=None, pos=None, return_kv=False) -> (y, kv)`.
  In full mode `kv` is None unless `return_kv`, then the per-layer keys and
  values `[L, B, T, H, Dh]` (to prefill a cache); in cached mode (cache
  `[L, B, H, T_max, Dh]` given) the updated cache.

  Attributes:
    scan: True runs the layers as one loop (compile time flat in depth);
      False unrolls it (the same stacked parameters, often faster for small
      models: no loop-carried buffers).
    remat: a `REMAT_POLICIES` name ('none' = no rematerialisation) or a bool.
    attention: `jax.nn.dot_product_attention`'s implementation.
    precision: of every matmul (`precision()`; None: the backend default).
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int
  causal: bool
  dtype: Dtype = jnp.float32
  remat: Any = "none"
  scan: bool = True
  attention: Optional[str] = "xla"
  precision: Optional[str] = None

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, pos=None,
               return_kv: bool = False):
    policy = remat_policy(self.remat)
    layer = (nn.remat(Layer, prevent_cse=False,
                      policy=REMAT_POLICIES[policy]) if policy else Layer)
    stack = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        length=self.num_layers,
        unroll=1 if self.scan else self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x = nn.with_logical_constraint(x.astype(self.dtype),
                                   ("batch", "length", "embed"))
    x, kv = stack(self.num_heads, self.mlp_ratio, self.causal, self.dtype,
                  self.attention, return_kv, self.precision,
                  name="layers")(x, cache, pos)
    if cache is not None:
      # The layers only read the cache; the new tokens' keys/values
      # `[L, B, t, H, Dh]` go in with one update after the loop, which XLA
      # does in place (a cache carried through the layer loop is copied
      # whole at every step).
      kv = write_cache(cache, kv, pos)
    return LayerNorm(self.dtype, name="norm")(x), kv


def write_cache(cache: Cache, kv: Cache, pos) -> Cache:
  """Writes per-layer keys/values `[L, B, t, H, Dh]` (the layers' output)
  into a cache `[L, B, H, T_max, Dh]` at positions `pos .. pos + t - 1`."""
  return tuple(jax.lax.dynamic_update_slice(
      c, jnp.swapaxes(new, 2, 3).astype(c.dtype), (0, 0, 0, pos, 0))
               for c, new in zip(cache, kv))


def init_cache(num_layers: int, batch: int, length: int, width: int,
               num_heads: int, dtype=jnp.float32) -> Cache:
  """An empty KV cache `(k, v)`, each `[L, B, H, length, Dh]`."""
  shape = (num_layers, batch, num_heads, length, width // num_heads)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
