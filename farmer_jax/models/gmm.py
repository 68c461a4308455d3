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

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


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


def log_prob(z: jax.Array, mix: Mixture) -> jax.Array:
  """log p(z) under the mixture; z `[..., d]` broadcast against `mix`.

  Returns:
    `[...]`, nats, float32.
  """
  z = z.astype(jnp.float32)[..., None, :]  # [..., 1, d]
  u = (z - mix.means) / mix.scales
  comp = jnp.sum(-0.5 * u * u - jnp.log(mix.scales) - _HALF_LOG_2PI, axis=-1)
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
