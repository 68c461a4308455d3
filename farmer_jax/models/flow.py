"""The autoregressive flow (AF), spec section 2: TARFlow-style blocks.

Block `t` works on the token sequence in its own order (identity for even
`t`, reversed for odd `t`). A causal transformer reads `proj_in(x) + pos` and
a zero-initialised head gives, for token `i`, a shift `mu_i` and soft-clipped
log-scale `s_i = c tanh(raw / c)` from tokens `< i` (outputs shifted right,
token 0 gets zeros):

  forward  y_i = (x_i - mu_i) exp(-s_i),   log|det| = -sum_ik s_ik
  inverse  x_i = y_i exp(s_i) + mu_i       (sequential in i, KV-cached)

Token values and log-dets stay float32; only the transformer runs in the
configured activation dtype.

The blocks share one layout, so `AutoregressiveFlow` keeps their parameters
stacked (`params['blocks']`, leading axis = block) and runs them with
`nn.scan`: one compiled block body whatever the depth. Alternating orders
become "reverse the sequence after every block", so every scan step is the
same program.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import layers


def _shift_right(a: jax.Array) -> jax.Array:
  """`[B, N, F]` -> output for token i taken from position i-1; zeros at 0."""
  return jnp.pad(a, ((0, 0), (1, 0), (0, 0)))[:, :-1]


class FlowBlock(nn.Module):
  """One invertible AF block on tokens `[B, N, d]` already in its order.

  Attributes:
    cfg: the model config (uses af_width, af_heads, af_layers_per_block,
      mlp_ratio, scale_clip, af_class_cond, num_classes, dtype, remat,
      scan_layers, attention, matmul_precision).
    num_tokens: N.
    token_dim: d.
    causal: True for the flow; the one-step student (`models/student.py`,
      spec section 8) builds the same block with bidirectional attention.
  """
  cfg: Any
  num_tokens: int
  token_dim: int
  causal: bool = True

  def setup(self):
    cfg = self.cfg
    w = cfg.af_width
    dtype = jnp.dtype(cfg.dtype)
    prec = layers.precision(cfg.matmul_precision)
    self.proj_in = nn.Dense(
        w, dtype=dtype, precision=prec, name="proj_in",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (None, "embed")))
    self.pos_emb = self.param(
        "pos_emb", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("length", "embed")),
        (self.num_tokens, w))
    if cfg.af_class_cond:
      self.class_emb = nn.Embed(
          cfg.num_classes + 1, w, name="class_emb",
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(0.02), ("vocab", "embed")))
    self.transformer = layers.Transformer(
        cfg.af_layers_per_block, cfg.af_heads, cfg.mlp_ratio,
        causal=self.causal, dtype=dtype, remat=cfg.remat,
        scan=cfg.scan_layers, attention=cfg.attention, precision=prec,
        name="transformer")
    # Zero init: the block starts as the identity map (spec section 2).
    self.head = nn.Dense(
        2 * self.token_dim, dtype=jnp.float32, precision=prec, name="head",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed", None)),
        bias_init=nn.initializers.zeros)

  def _embed(self, x, labels, pos):
    h = self.proj_in(x) + self.pos_emb[pos].astype(jnp.dtype(self.cfg.dtype))
    if self.cfg.af_class_cond:
      h = h + self.class_emb(labels)[:, None].astype(h.dtype)
    return h

  def _shift_scale(self, h) -> Tuple[jax.Array, jax.Array]:
    out = self.head(h.astype(jnp.float32))
    mu, raw = jnp.split(out, 2, axis=-1)
    c = self.cfg.scale_clip
    return mu, c * jnp.tanh(raw / c)

  def params_for(self, x, labels):
    """(mu, s) `[B, N, d]` each; token i's from tokens < i. For tests."""
    h, _ = self.transformer(self._embed(x, labels, jnp.arange(x.shape[1])))
    mu, s = self._shift_scale(h)
    return _shift_right(mu), _shift_right(s)

  def chunk_params(self, x, labels, cache, pos):
    """Head outputs of `t` tokens `x [B, t, d]` at positions `pos ..`.

    Attends causally to the cache (positions `< pos`) and to the chunk
    itself, as the exact inverse's steps do one token at a time; with no
    cache (None, `pos` 0) plain causal attention over the chunk. Output `j`
    is `(mu, s)` of the token at `pos + j + 1` (not shifted here); the
    Jacobi decoder (`models/jacobi.py`) is its caller.

    Returns:
      `(mu [B, t, d], s [B, t, d], cache)`, the cache with the chunk's keys
      and values written at `pos .. pos + t - 1` (None without one).
    """
    h = self._embed(x, labels, pos + jnp.arange(x.shape[1]))
    h, cache = self.transformer(h, cache, pos)
    mu, s = self._shift_scale(h)
    return mu, s, cache

  def __call__(self, x, labels):
    """Forward `x [B, N, d]` -> `(y [B, N, d], logdet [B])`, parallel."""
    mu, s = self.params_for(x, labels)
    y = (x.astype(jnp.float32) - mu) * jnp.exp(-s)
    return y, -jnp.sum(s, axis=(1, 2))

  def inverse(self, y, labels):
    """Exact inverse `y [B, N, d]` -> `x`, one token per `nn.scan` step."""
    b, n, d = y.shape
    cfg = self.cfg
    cache = layers.init_cache(cfg.af_layers_per_block, b, n, cfg.af_width,
                              cfg.af_heads, jnp.dtype(cfg.dtype))

    def step(mdl, carry, inputs):
      cache, mu, s = carry
      y_i, pos = inputs
      x_i = y_i * jnp.exp(s) + mu
      h = mdl._embed(x_i[:, None], labels, pos[None])
      h, cache = mdl.transformer(h, cache, pos)
      mu_next, s_next = mdl._shift_scale(h[:, 0])
      return (cache, mu_next, s_next), x_i

    scan = nn.scan(step, variable_broadcast="params",
                   split_rngs={"params": False})
    zeros = jnp.zeros((b, d), jnp.float32)
    _, x_nbd = scan(self, (cache, zeros, zeros),
                    (jnp.swapaxes(y.astype(jnp.float32), 0, 1), jnp.arange(n)))
    return jnp.swapaxes(x_nbd, 0, 1)


def _flip(x: jax.Array) -> jax.Array:
  return x[:, ::-1]


def to_raster(ys: jax.Array) -> jax.Array:
  """Stacked per-block outputs `[n, B, N, d]` in block order -> raster order."""
  odd = (jnp.arange(ys.shape[0]) % 2 == 1)[:, None, None, None]
  return jnp.where(odd, ys[:, :, ::-1], ys)


def scan_blocks(body, cfg, reverse: bool = False):
  """`nn.scan` of `body(block, carry, _)` over the stacked flow blocks."""
  return nn.scan(
      body, variable_axes={"params": 0}, split_rngs={"params": True},
      length=cfg.af_blocks, reverse=reverse,
      unroll=1 if cfg.scan_layers else cfg.af_blocks,
      metadata_params={nn.PARTITION_NAME: "blocks"})


def block_order_flip(cfg) -> bool:
  """Whether `z` is the last scan carry reversed (see `AutoregressiveFlow`).

  The scan leaves the sequence in block `n`'s order (raster for even `n`);
  `z` is the last block's order with `terminal_permutation`, else raster.
  """
  return bool(cfg.terminal_permutation) or cfg.af_blocks % 2 == 1


def terminal_flip(cfg) -> bool:
  """Whether `z` is `Z_n` (raster) reversed: the terminal permutation."""
  return bool(cfg.terminal_permutation) and (cfg.af_blocks - 1) % 2 == 1


class AutoregressiveFlow(nn.Module):
  """`F = f_n o ... o f_1` on tokens `[B, N, d]` in raster order.

  `__call__` returns `(z, logdet)`; with `cfg.terminal_permutation` the
  latent sequence is returned in the last block's order (spec section 2),
  otherwise in raster order. `inverse` undoes exactly that.

  Attributes:
    cfg: the model config (see `FlowBlock`; `af_blocks`,
      `terminal_permutation`).
    num_tokens: N.
    token_dim: d.
  """
  cfg: Any
  num_tokens: int
  token_dim: int

  def setup(self):
    self.blocks = FlowBlock(self.cfg, self.num_tokens, self.token_dim,
                            name="blocks")

  def _forward(self, x, labels, keep_path: bool):
    def body(block, carry, _):
      x, logdet = carry
      y, ld = block(x, labels)
      return (_flip(y), logdet + ld), (y if keep_path else None)

    carry = (x.astype(jnp.float32), jnp.zeros(x.shape[0], jnp.float32))
    return scan_blocks(body, self.cfg)(self.blocks, carry, None)

  def __call__(self, x, labels):
    (z, logdet), _ = self._forward(x, labels, keep_path=False)
    return (_flip(z) if block_order_flip(self.cfg) else z), logdet

  def path(self, x, labels):
    """The forward path `[Z_0 = x, Z_1, ..., Z_n]` (spec section 8).

    Each `Z_t [B, N, d]` is block t's output in raster order; `Z_n` is
    `__call__`'s `z` before the terminal permutation.
    """
    _, ys = self._forward(x, labels, keep_path=True)
    ys = to_raster(ys)
    return [x.astype(jnp.float32)] + [ys[t] for t in range(ys.shape[0])]

  def inverse(self, z, labels):
    def body(block, x, _):
      return block.inverse(_flip(x), labels), None

    x = _flip(z) if block_order_flip(self.cfg) else z
    x, _ = scan_blocks(body, self.cfg, reverse=True)(
        self.blocks, x.astype(jnp.float32), None)
    return x

  def block_apply(self, t: int, method: str, x, labels):
    """Block `t` alone (`'__call__'`, `'params_for'` or `'inverse'`) on `x`
    in block t's own token order. For tests and benchmarks."""
    return apply_block(self, t, method, x, labels)


def apply_block(module: nn.Module, t: int, method: str, x, labels,
                causal: bool = True):
  """Runs block `t` of a bound module with stacked `blocks` parameters."""
  params = jax.tree.map(lambda a: a[t],
                        nn.meta.unbox(module.variables["params"]["blocks"]))
  block = FlowBlock(module.cfg, module.num_tokens, module.token_dim, causal,
                    parent=None)
  return block.apply({"params": params}, x, labels, method=method)


def stack_blocks(flow_params: dict) -> dict:
  """Flow params saved with one entry per block (`block0`, `block1`, ...,
  one subtree each) -> the stacked `{'blocks': ...}` layout.
  Anything already stacked is returned as is."""
  names = sorted((k for k in flow_params if k.startswith("block")
                  and k[5:].isdigit()), key=lambda k: int(k[5:]))
  if not names:
    return flow_params
  rest = {k: v for k, v in flow_params.items() if k not in names}
  rest["blocks"] = jax.tree.map(lambda *a: jnp.stack(a),
                                *[flow_params[k] for k in names])
  return rest
