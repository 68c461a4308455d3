"""Block-wise Jacobi (Gauss-Seidel-Jacobi) inversion of the AF flow.

The exact inverse of a block (`flow.FlowBlock.inverse`) is sequential over
its N tokens: `x_i = y_i exp(s_i) + mu_i`, `(mu_i, s_i)` a function of
`x_<i`. Here the tokens are cut into chunks of `C` (GS-Jacobi for TARFlow,
Liu & Qin 2025; STARFlow's Jacobi decoding): the chunks go one after the
other (Gauss-Seidel), and the tokens of a chunk are updated together
(Jacobi),

  x^{k+1}_i = y_i exp(s_i(x^k_<i)) + mu_i(x^k_<i),    x^0 = y,

one transformer pass over the chunk per iteration, attending to the earlier
chunks through the KV cache and causally to the chunk's current iterate.
The system is triangular: after `k` iterations the chunk's first `k` tokens
are exact, so `C` iterations give the exact inverse up to float rounding
(`C = 1` is the sequential inverse with one extra pass per token, `C = N`
pure Jacobi). An image's chunk stops when its relative change

  max_{i,k} |x^{k+1} - x^k| / (max_{i,k} |x^k| + EPS)     (over the chunk)

falls below `tol`, or after `max_iters` iterations. An image that stopped
keeps its iterate (frozen) while the rest of the batch goes on, so its
result does not depend on which images share its batch; the
`lax.while_loop` over iterations ends when every image has stopped. One more
pass on the final chunk writes its keys/values into the cache and gives
`(mu, s)` of the next chunk's first token (pure Jacobi, one chunk, needs
no cache at all).

Blocks may have their own chunk sizes and limits (`JacobiOptions`): their
convergence differs (on the trained digits model blocks 1 and 3 take ~20%
more iterations than 0 and 2; STARFlow reports slow blocks too). Consecutive blocks with
one chunk size run as one `lax.scan` with their limits as scan inputs, so
compile time grows with the number of chunk-size changes, not with depth.
Tokens are float32 throughout, as in the exact inverse.
"""
import dataclasses
from typing import Any, List, Tuple

import jax
import jax.numpy as jnp

from farmer_jax.models import flow
from farmer_jax.models import layers

# Floor of the relative change's denominator: a chunk of near-zero tokens is
# judged by its absolute change divided by EPS.
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class JacobiOptions:
  """Chunk sizes and stopping rule of the Jacobi decoder, per flow block.

  Built from `config.sample` by `config_lib.jacobi_plan` (which resolves
  its 0 defaults and per-block overrides). Hashable: a static jit argument.

  Attributes:
    chunks: tokens per chunk `C_t` of each flow block `t` (block 0 is the
      one nearest the data, decoded last); each divides N.
    max_iters: iteration limit per chunk of each block, in `1 .. C_t`
      (`C_t` iterations are already exact).
    tol: an image's chunk stops when its relative change is below `tol`;
      0 always runs `max_iters` iterations.
  """
  chunks: Tuple[int, ...]
  max_iters: Tuple[int, ...]
  tol: float

  def __post_init__(self):
    if len(self.chunks) != len(self.max_iters):
      raise ValueError(f"JacobiOptions: {len(self.chunks)} chunk sizes but "
                       f"{len(self.max_iters)} iteration limits; give one of "
                       "each per flow block.")
    for t, (c, m) in enumerate(zip(self.chunks, self.max_iters)):
      if not (c >= 1 and 1 <= m <= c):
        raise ValueError(f"JacobiOptions: block {t} has chunk {c} and "
                         f"max_iters {m}; need chunk >= 1 and 1 <= max_iters "
                         "<= chunk.")
    if not self.tol >= 0:
      raise ValueError(f"JacobiOptions: tol={self.tol!r} must be >= 0.")


def block_inverse(block: flow.FlowBlock, params: Any, y: jax.Array,
                  labels: jax.Array, chunk: int, max_iters, tol: float):
  """Jacobi inverse of one block, `y [B, N, d]` in the block's token order.

  Args:
    block: an unbound `FlowBlock` (its attributes; `params` are its weights).
    params: the block's parameters (no `{'params': ...}` wrapper).
    y: the block's output tokens.
    labels: `[B]` int (used only if `af_class_cond`).
    chunk: tokens per chunk; divides N.
    max_iters: iteration limit per chunk (may be traced), `<= chunk`.
    tol: the stopping tolerance on the relative change.

  Returns:
    `(x [B, N, d] float32, iterations [B, N // chunk] int32)`: the Jacobi
    iterations each image's chunk took (not counting the cache pass).
  """
  b, n, d = y.shape
  cfg = block.cfg
  if n % chunk:
    raise ValueError(f"Jacobi chunk {chunk} does not divide the {n} tokens.")
  num_chunks = n // chunk

  def chunk_params(x_c, cache, pos):
    return block.apply({"params": params}, x_c, labels, cache, pos,
                       method=flow.FlowBlock.chunk_params)

  def solve(cache, mu_0, s_0, y_c, pos):
    """The chunk at `pos` by Jacobi iterations: `(x_c, iterations [B])`."""
    def update(x_c):
      mu, s, _ = chunk_params(x_c, cache, pos)
      # Output j is token j+1's; the chunk's first token's came with the
      # previous chunk's cache pass (zeros for token 0).
      mu = jnp.concatenate([mu_0[:, None], mu[:, :-1]], axis=1)
      s = jnp.concatenate([s_0[:, None], s[:, :-1]], axis=1)
      return y_c * jnp.exp(s) + mu

    def cond(state):
      k, _, done, _ = state
      return (k < max_iters) & ~jnp.all(done)

    def body(state):
      k, x_c, done, iters = state
      x_new = update(x_c)
      change = (jnp.max(jnp.abs(x_new - x_c), axis=(1, 2))
                / (jnp.max(jnp.abs(x_c), axis=(1, 2)) + EPS))
      x_c = jnp.where(done[:, None, None], x_c, x_new)  # frozen images
      iters = iters + (~done).astype(jnp.int32)
      return k + 1, x_c, done | (change < tol), iters

    state = (jnp.int32(0), y_c, jnp.zeros((b,), bool),
             jnp.zeros((b,), jnp.int32))
    _, x_c, _, iters = jax.lax.while_loop(cond, body, state)
    return x_c, iters

  def solve_and_cache(carry, inputs):
    cache, mu_0, s_0 = carry
    y_c, pos = inputs
    x_c, iters = solve(cache, mu_0, s_0, y_c, pos)
    mu, s, cache = chunk_params(x_c, cache, pos)  # the cache pass
    return (cache, mu[:, -1], s[:, -1]), (x_c, iters)

  zeros = jnp.zeros((b, d), jnp.float32)
  y = y.astype(jnp.float32)
  if num_chunks == 1:
    # Pure Jacobi: no earlier tokens, so plain causal attention over the
    # chunk, and no cache pass (no token follows).
    x, iters = solve(None, zeros, zeros, y, jnp.int32(0))
    return x, iters[:, None]
  cache = layers.init_cache(cfg.af_layers_per_block, b, n, cfg.af_width,
                            cfg.af_heads, jnp.dtype(cfg.dtype))
  y_chunks = jnp.swapaxes(y.reshape(b, num_chunks, chunk, d), 0, 1)
  _, (x, iters) = jax.lax.scan(
      solve_and_cache, (cache, zeros, zeros),
      (y_chunks, jnp.arange(num_chunks, dtype=jnp.int32) * chunk))
  return jnp.swapaxes(x, 0, 1).reshape(b, n, d), jnp.swapaxes(iters, 0, 1)


def _runs(chunks: Tuple[int, ...]) -> List[Tuple[int, int]]:
  """`[(lo, hi), ...]`: maximal ranges of blocks with one chunk size."""
  runs, lo = [], 0
  for t in range(1, len(chunks) + 1):
    if t == len(chunks) or chunks[t] != chunks[lo]:
      runs.append((lo, t))
      lo = t
  return runs


def flow_inverse(block: flow.FlowBlock, block_params: Any, z: jax.Array,
                 labels: jax.Array, options: JacobiOptions):
  """`F^{-1}(z)` block by block, each block by `block_inverse`.

  Args:
    block: an unbound `FlowBlock` of the flow (`cfg`, `num_tokens`,
      `token_dim`).
    block_params: the flow's stacked block parameters (`params['flow']
      ['blocks']`, leading axis = block).
    z: `[B, N, d]` latents in the AR prior's order (as
      `AutoregressiveFlow.inverse` takes them).
    labels: `[B]` int.
    options: one chunk size and limit per block.

  Returns:
    `(x [B, N, d] raster order, iterations [B, af_blocks] float32)`:
    `iterations[:, t]` is each image's mean number of Jacobi iterations per
    chunk in block `t`.
  """
  cfg = block.cfg
  n = z.shape[1]
  if len(options.chunks) != cfg.af_blocks:
    raise ValueError(f"JacobiOptions has {len(options.chunks)} blocks; the "
                     f"flow has {cfg.af_blocks}.")
  x = z[:, ::-1] if flow.block_order_flip(cfg) else z
  x = x.astype(jnp.float32)
  means = {}
  for lo, hi in reversed(_runs(options.chunks)):  # block n-1 first
    chunk = options.chunks[lo]

    def body(x, inputs, chunk=chunk):
      params, max_iters = inputs
      x, iters = block_inverse(block, params, x[:, ::-1], labels, chunk,
                               max_iters, options.tol)
      return x, jnp.sum(iters, axis=-1) / (n // chunk)

    inputs = (jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], block_params),
              jnp.asarray(options.max_iters[lo:hi], jnp.int32))
    x, means[lo] = jax.lax.scan(
        body, x, inputs, reverse=True,
        unroll=1 if cfg.scan_layers else hi - lo)
  iterations = jnp.concatenate([means[lo] for lo in sorted(means)], axis=0)
  return x, iterations.T.astype(jnp.float32)
