"""The whole FARMER model: patchify -> AF flow -> AR prior, exact NLL.

Public API (all on images `x [B, H, W, C]` in `[-1, 1]`, labels `[B]` int):

* `encode(x, labels) -> (z [B, N, d], logdet [B])`, logdet = log|det dF/dx|;
* `decode(z, labels) -> x`, the exact inverse (KV-cached `nn.scan`);
* `decode_jacobi(z, labels, options) -> (x, iterations)`, the block-wise
  Jacobi inverse (`models/jacobi.py`) and its iteration counts;
* `prior_log_prob(z, labels) -> [B]`, nats;
* `log_prob(x, labels) -> [B]`, the continuous density in nats;
* `__call__(x, labels, train)` -> dict of per-image terms for the loss.

`z` is in the AR prior's token order (the last flow block's order when
`terminal_permutation` is on); `decode` expects the same order.
"""
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from farmer_jax.models import ar
from farmer_jax.models import flow
from farmer_jax.models import gmm
from farmer_jax.models import jacobi


def patchify(x: jax.Array, p: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, (H/p)(W/p), p*p*C]`, patches in raster order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Exact inverse of `patchify` for an `h x w` image."""
  b, _, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


class Farmer(nn.Module):
  """FARMER built from `config.model` (see configs/digits.py for the keys)."""
  config: Any

  def __post_init__(self):
    if isinstance(self.config, ml_collections.ConfigDict):
      object.__setattr__(self, "config",
                         ml_collections.FrozenConfigDict(self.config))
    super().__post_init__()

  @property
  def num_tokens(self) -> int:
    return (self.config.image_size // self.config.patch_size) ** 2

  @property
  def token_dim(self) -> int:
    return self.config.patch_size ** 2 * self.config.channels

  def setup(self):
    self.flow = flow.AutoregressiveFlow(self.config, self.num_tokens,
                                        self.token_dim, name="flow")
    if self.config.prior == "farmer":
      self.prior = ar.ARPrior(self.config, self.num_tokens, self.token_dim,
                              name="prior")
    elif self.config.prior != "gaussian":
      raise ValueError(f"config.model.prior={self.config.prior!r}: use "
                       "'farmer' or 'gaussian'.")

  def encode(self, x, labels):
    """Image -> `(z [B, N, d], logdet [B])`; see module docstring."""
    return self.flow(patchify(x, self.config.patch_size), labels)

  def decode(self, z, labels):
    """Latents `[B, N, d]` -> image `[B, H, W, C]` (exact inverse, no clip)."""
    s = self.config.image_size
    return unpatchify(self.flow.inverse(z, labels), self.config.patch_size,
                      s, s)

  def decode_jacobi(self, z, labels, options: jacobi.JacobiOptions):
    """Latents `[B, N, d]` -> `(image [B, H, W, C], iterations [B, n])` by
    the Jacobi decoder (no clip); `iterations[:, t]` is each image's mean
    number of Jacobi iterations per chunk in flow block `t`."""
    block = flow.FlowBlock(self.config, self.num_tokens, self.token_dim,
                           parent=None)
    params = nn.meta.unbox(self.variables["params"]["flow"]["blocks"])
    tokens, iterations = jacobi.flow_inverse(block, params, z, labels,
                                             options)
    s = self.config.image_size
    return unpatchify(tokens, self.config.patch_size, s, s), iterations

  def prior_terms(self, z, labels, train: bool = False):
    """`(log p(Z^I), log p(Z^R | Z^I))` `[B]` each; gaussian: (all, 0)."""
    if self.config.prior == "gaussian":
      z = z.astype(jnp.float32)
      logp = jnp.sum(-0.5 * z * z - gmm.HALF_LOG_2PI, axis=(1, 2))
      return logp, jnp.zeros_like(logp)
    return self.prior.log_prob(z, labels, train)

  def prior_log_prob(self, z, labels, train: bool = False):
    """log p(z | c) in nats, `[B]`."""
    logp_i, logp_r = self.prior_terms(z, labels, train)
    return logp_i + logp_r

  def log_prob(self, x, labels, train: bool = False):
    """Continuous log-density of `x` in nats, `[B]` (spec section 5)."""
    z, logdet = self.encode(x, labels)
    return self.prior_log_prob(z, labels, train) + logdet

  def __call__(self, x, labels, train: bool = False) -> Dict[str, jax.Array]:
    """Per-image terms of `log p(x | c)`, nats, `[B]` each.

    Returns:
      dict with `logdet`, `logp_I`, `logp_R` and their sum `log_prob`.
    """
    z, logdet = self.encode(x, labels)
    logp_i, logp_r = self.prior_terms(z, labels, train)
    return dict(logdet=logdet, logp_I=logp_i, logp_R=logp_r,
                log_prob=logdet + logp_i + logp_r)


def init_params(model: Farmer, rngs):
  """`model.init` on a one-image dummy batch: the params, still boxed
  (`nn.LogicallyPartitioned`), so callers can read their logical axes."""
  cfg = model.config
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  return model.init(rngs, x, jnp.zeros((1,), jnp.int32))["params"]
