"""Diagonal Gaussian mixtures: parameterisation, log-density and sampling.

A mixture over `R^d` with `K` components is a tuple of float32 arrays
`(logits [..., K], means [..., K, d], scales [..., K, d])`; leading axes are
batch/token axes. All arithmetic here is float32 whatever the activation
dtype (spec section 5).
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Mixture(NamedTuple):
  logits: jax.Array  # [..., K]
  means: jax.Array  # [..., K, d]
  scales: jax.Array  # [..., K, d], > 0


def num_outputs(k: int, d: int) -> int:
  """Width of the raw head output that `split_head` turns into a Mixture."""
  return k * (1 + 2 * d)


def split_head(raw: jax.Array, k: int, d: int, scale_floor: float) -> Mixture:
  """Raw head output `[..., K*(1+2d)]` -> Mixture (scales: softplus + floor)."""
  raw = raw.astype(jnp.float32)
  logits = raw[..., :k]
  rest = raw[..., k:].reshape(raw.shape[:-1] + (k, 2, d))
  scales = jax.nn.softplus(rest[..., 1, :]) + scale_floor
  return Mixture(logits, rest[..., 0, :], scales)


def _component_log_probs(z, means, scales):
  """`[..., 1, d]` against `[..., K, d]` -> per-component log N, `[..., K]`."""
  u = (z - means) / scales
  return jnp.sum(-0.5 * u * u - jnp.log(scales) - HALF_LOG_2PI, axis=-1)


def log_prob(z: jax.Array, mix: Mixture) -> jax.Array:
  """log p(z) under the mixture; z `[..., d]` broadcast against `mix`.

  The per-component terms are rematerialised in the backward pass, so no
  `[..., K, d]` intermediate (e.g. `[B, N, K_R, d_R]` when one shared
  mixture scores all N tokens) is kept for it: XLA fuses the broadcast into
  the reductions over `d` (forward) and over the broadcast axes (backward).
  The quadratic is not expanded into `z^2/s^2 - 2 z mu/s^2 + mu^2/s^2`
  matmuls: in float32 that cancels catastrophically for small scales
  (measured: 19 nats error at scales 1e-3, 0.28 at 1e-2, d = 640).

  Returns:
    `[...]`, nats, float32.
  """
  with jax.named_scope("mixture_log_prob"):
    z = z.astype(jnp.float32)[..., None, :]  # [..., 1, d]
    comp = jax.checkpoint(_component_log_probs)(z, mix.means, mix.scales)
    return jax.nn.logsumexp(jax.nn.log_softmax(mix.logits, axis=-1) + comp,
                            axis=-1)


def sample(rng: jax.Array, mix: Mixture, logit_temp: float = 1.0,
           scale_temp: float = 1.0) -> jax.Array:
  """Draws one sample per leading index: `[..., d]`.

  Args:
    rng: PRNG key.
    mix: the mixture.
    logit_temp: temperature on the component logits (1 = exact sampling).
    scale_temp: factor on the component scales (1 = exact sampling).
  """
  rng_k, rng_n = jax.random.split(rng)
  comp = jax.random.categorical(rng_k, mix.logits / logit_temp, axis=-1)
  take = lambda a: jnp.take_along_axis(a, comp[..., None, None], axis=-2)[
      ..., 0, :]
  means, scales = take(mix.means), take(mix.scales)
  eps = jax.random.normal(rng_n, means.shape, jnp.float32)
  return means + scale_temp * scales * eps
