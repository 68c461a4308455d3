"""Sampling from FARMER: KV-cached AR decoding, guidance, the AF inverse.

Spec sections 6-7. `sample_latents` decodes `z_1^I ... z_N^I` one token per
step of a single `lax.scan` with preallocated KV caches, then feeds the extra
token and draws every `z_i^R` from the shared mixture `GMM_R`.
`sample_images` runs the exact flow inverse (`Farmer.decode`), an optional
Tweedie denoising step, and clips to `[-1, 1]`.

Classifier-free guidance keeps two streams, conditional (the labels) and
unconditional (the null label `num_classes`), each with its own KV cache; the
token chosen at each step is fed to both. The streams are stacked on a
leading axis of size 2 and the prior is `vmap`ped over it, so one traced
network step serves both and the batch axis stays where the caller sharded
it. Each AR step (and each `z_i^R` draw) applies one of the rules below to
the step's conditional and unconditional mixtures `p_c`, `p_u`, after the
temperatures (logits / `logit_temp`, scales * `scale_temp`) are applied to
both. The guided target is `p* ∝ p_c^{1+w} / p_u^w`, `w = cfg_scale`.

* 'resample' (spec section 7, the default): draw `s` candidates from `p_c`
  and `s'` from `p_u`; weigh each by `p*(z) / q(z)` with
  `q = (s p_c + s' p_u) / (s + s')`; pick one with probability proportional
  to its weight (self-normalised importance resampling; exact as
  `s + s' -> inf`, and exactly `p_c` for `w = 0`).
* 'rejection' (GIVT / JetFormer, big_vision `givt/parallel_decode.py`
  `CFGDensity`): pick one component index `k ~ p_c`'s logits and take the
  Gaussians of component `k` of both mixtures; then, independently per
  dimension, rejection-sample the 1-D density
  `N(m_c, s_c)^{1+w} / N(m_u, s_u)^w` with proposal `N(m_c, 2 max(s_c, s_u))`
  (GIVT's proposal) and `num_candidates` tries, keeping the first accepted
  draw and falling back to `N(m_c, s_c)` when none is accepted (as GIVT).
  GIVT bounds the density ratio on a grid of 1001 points; here the log ratio
  is a quadratic, so its maximum over `m_c ± 6` proposal stds is exact.
* 'closed_form': the same component pairing, but the per-dimension product
  of Gaussian powers is itself Gaussian, with precision
  `(1+w)/s_c^2 - w/s_u^2` and mean `((1+w) m_c/s_c^2 - w m_u/s_u^2) / prec`;
  sampled directly (falls back to `N(m_c, s_c)` where the precision is not
  positive, i.e. where the target is improper).
* 'none', or `cfg_scale == 0`, or an unconditional model: plain conditional
  sampling with one stream.

Everything is jittable with the options bound statically (e.g. with
`functools.partial`), deterministic given `rng`, and batch-parallel: no
operation mixes batch elements, so it shards over the data axis when the
caller jits it with sharded `labels`.
"""
import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from farmer_jax.config_lib import GUIDANCE_RULES
from farmer_jax.models import Farmer
from farmer_jax.models import gmm

# Half-width, in proposal stds, of the window on which the 'rejection' rule
# bounds its density ratio; proposal mass outside it is ~2e-9.
_REJECTION_WINDOW = 6.0


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """Static options of one sampler (see the module docstring).

  Attributes:
    cfg_scale: guidance weight `w`; 0 = plain conditional sampling.
    num_candidates: 'resample': candidates from `p_c` (`s`); 'rejection':
      proposals tried per dimension (GIVT tries 1000; acceptance falls as
      `w` grows, and a dimension with none accepted falls back to `p_c`).
    num_uncond_candidates: 'resample': candidates from `p_u` (`s'`).
    guidance: one of `GUIDANCE_RULES`.
    logit_temp: temperature on mixture logits (1 = exact).
    scale_temp: factor on mixture scales (1 = exact).
  """
  cfg_scale: float = 0.0
  num_candidates: int = 16
  num_uncond_candidates: int = 0
  guidance: str = "resample"
  logit_temp: float = 1.0
  scale_temp: float = 1.0

  def __post_init__(self):
    if self.guidance not in GUIDANCE_RULES:
      raise ValueError(f"guidance={self.guidance!r}: use one of "
                       f"{GUIDANCE_RULES}.")
    if self.guided and self.num_candidates < 1:
      raise ValueError(f"num_candidates={self.num_candidates}: need >= 1.")
    if self.num_uncond_candidates < 0:
      raise ValueError("num_uncond_candidates must be >= 0.")

  @property
  def guided(self) -> bool:
    return self.guidance != "none" and self.cfg_scale != 0.0


# --- Guidance rules: pure functions of mixtures ----------------------------


def temper(mix: gmm.Mixture, logit_temp: float = 1.0,
           scale_temp: float = 1.0) -> gmm.Mixture:
  """The mixture `gmm.sample(rng, mix, logit_temp, scale_temp)` draws from."""
  return gmm.Mixture(mix.logits / logit_temp, mix.means,
                     mix.scales * scale_temp)


def _draws(rng: jax.Array, mix: gmm.Mixture, n: int) -> jax.Array:
  """`n` independent draws per leading index: `[n, ..., d]`."""
  return jax.vmap(lambda key: gmm.sample(key, mix))(jax.random.split(rng, n))


def resample_cfg(rng: jax.Array, mix_c: gmm.Mixture, mix_u: gmm.Mixture,
                 cfg_scale: float, num_cond: int,
                 num_uncond: int = 0) -> jax.Array:
  """Resampling CFG (spec section 7): one draw per leading index.

  Args:
    rng: PRNG key.
    mix_c: conditional mixture, leading axes `[...]`.
    mix_u: unconditional mixture, same shapes.
    cfg_scale: `w`.
    num_cond: `s`, candidates drawn from `p_c`.
    num_uncond: `s'`, candidates drawn from `p_u`.

  Returns:
    `[..., d]`, approximately distributed as `p_c^{1+w} / p_u^w`.
  """
  rng_c, rng_u, rng_pick = jax.random.split(rng, 3)
  cands = [_draws(rng_c, mix_c, num_cond)]
  if num_uncond:
    cands.append(_draws(rng_u, mix_u, num_uncond))
  z = jnp.concatenate(cands, axis=0)  # [S, ..., d]
  logp_c, logp_u = gmm.log_prob(z, mix_c), gmm.log_prob(z, mix_u)
  log_target = logp_u + (1.0 + cfg_scale) * (logp_c - logp_u)
  total = num_cond + num_uncond
  log_q = logp_c if not num_uncond else jnp.logaddexp(
      math.log(num_cond / total) + logp_c,
      math.log(num_uncond / total) + logp_u)
  pick = jax.random.categorical(rng_pick, log_target - log_q, axis=0)
  return jnp.take_along_axis(z, pick[None, ..., None], axis=0)[0]


def _paired_component(rng: jax.Array, mix_c: gmm.Mixture, mix_u: gmm.Mixture):
  """`k ~ p_c`'s logits; `(m_c, s_c, m_u, s_u)` of component k, `[..., d]`."""
  k = jax.random.categorical(rng, mix_c.logits, axis=-1)
  take = lambda a: jnp.take_along_axis(a, k[..., None, None], axis=-2)[
      ..., 0, :]
  return take(mix_c.means), take(mix_c.scales), take(mix_u.means), take(
      mix_u.scales)


def _normal_logpdf(x, mean, scale):
  u = (x - mean) / scale
  return -0.5 * u * u - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


def rejection_cfg(rng: jax.Array, mix_c: gmm.Mixture, mix_u: gmm.Mixture,
                  cfg_scale: float, num_tries: int) -> jax.Array:
  """GIVT/JetFormer per-dimension rejection CFG (module docstring).

  Args:
    rng: PRNG key.
    mix_c: conditional mixture, leading axes `[...]`.
    mix_u: unconditional mixture, same shapes.
    cfg_scale: `w`.
    num_tries: proposals per dimension.

  Returns:
    `[..., d]`.
  """
  rng_k, rng_x, rng_a, rng_fb = jax.random.split(rng, 4)
  m_c, s_c, m_u, s_u = _paired_component(rng_k, mix_c, mix_u)
  w = cfg_scale
  s_p = 2.0 * jnp.maximum(s_c, s_u)

  def log_ratio(x):  # log target - log proposal; a quadratic in x.
    return ((1 + w) * _normal_logpdf(x, m_c, s_c)
            - w * _normal_logpdf(x, m_u, s_u) - _normal_logpdf(x, m_c, s_p))

  # Max of the quadratic on the window: at the clipped vertex or an end.
  prec = (1 + w) / s_c ** 2 - w / s_u ** 2 - 1 / s_p ** 2
  lin = (1 + w) * m_c / s_c ** 2 - w * m_u / s_u ** 2 - m_c / s_p ** 2
  lo, hi = m_c - _REJECTION_WINDOW * s_p, m_c + _REJECTION_WINDOW * s_p
  vertex = jnp.clip(lin / jnp.where(prec > 0, prec, 1.0), lo, hi)
  log_bound = jnp.maximum(jnp.maximum(log_ratio(lo), log_ratio(hi)),
                          jnp.where(prec > 0, log_ratio(vertex), -jnp.inf))

  x = m_c + s_p * jax.random.normal(rng_x, (num_tries,) + m_c.shape)
  log_u = jnp.log(jax.random.uniform(rng_a, x.shape, minval=1e-38))
  accept = log_u < log_ratio(x) - log_bound
  first = jnp.argmax(accept, axis=0)  # index of the first accepted try
  z = jnp.take_along_axis(x, first[None], axis=0)[0]
  fallback = m_c + s_c * jax.random.normal(rng_fb, m_c.shape)
  return jnp.where(jnp.any(accept, axis=0), z, fallback)


def closed_form_cfg(rng: jax.Array, mix_c: gmm.Mixture, mix_u: gmm.Mixture,
                    cfg_scale: float) -> jax.Array:
  """Exact per-dimension CFG Gaussian on the paired component, `[..., d]`."""
  rng_k, rng_n = jax.random.split(rng)
  m_c, s_c, m_u, s_u = _paired_component(rng_k, mix_c, mix_u)
  w = cfg_scale
  prec = (1 + w) / s_c ** 2 - w / s_u ** 2
  proper = prec > 0
  safe = jnp.where(proper, prec, 1.0)
  mean = jnp.where(proper, ((1 + w) * m_c / s_c ** 2 - w * m_u / s_u ** 2)
                   / safe, m_c)
  scale = jnp.where(proper, jax.lax.rsqrt(safe), s_c)
  return mean + scale * jax.random.normal(rng_n, m_c.shape)


def draw(rng: jax.Array, mix_c: gmm.Mixture, mix_u: Optional[gmm.Mixture],
         opts: SamplingOptions) -> jax.Array:
  """One token per leading index under `opts` (`mix_u=None`: unguided)."""
  if mix_u is None or not opts.guided:
    return gmm.sample(rng, mix_c, opts.logit_temp, opts.scale_temp)
  mix_c = temper(mix_c, opts.logit_temp, opts.scale_temp)
  mix_u = temper(mix_u, opts.logit_temp, opts.scale_temp)
  w = opts.cfg_scale
  if opts.guidance == "resample":
    return resample_cfg(rng, mix_c, mix_u, w, opts.num_candidates,
                        opts.num_uncond_candidates)
  if opts.guidance == "rejection":
    return rejection_cfg(rng, mix_c, mix_u, w, opts.num_candidates)
  return closed_form_cfg(rng, mix_c, mix_u, w)


# --- KV-cached AR decoding --------------------------------------------------


def _prior_fn(model, params, name: str, in_axes):
  """`model.prior.<name>` as a function `vmap`ped over the stream axis."""
  def call(*args):
    return model.apply(params, *args,
                       method=lambda m, *a: getattr(m.prior, name)(*a))
  return jax.vmap(call, in_axes=in_axes)


def _split_streams(mix: gmm.Mixture):
  """`[S, ...]` mixture -> `(mix_c, mix_u or None)`."""
  mix_c = jax.tree.map(lambda a: a[0], mix)
  mix_u = jax.tree.map(lambda a: a[1], mix) if mix.logits.shape[0] > 1 else None
  return mix_c, mix_u


def _prefill(model, params, stream_labels, caches):
  """Feeds the `r` cond tokens of each stream; mixture for `z_1^I`."""
  cond_fn = _prior_fn(model, params, "decode_cond", (0, 0, None))
  shapes = jax.eval_shape(cond_fn, stream_labels, caches, 0)[0]
  mix0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, pos):
    return cond_fn(stream_labels, carry[1], pos), None

  (mix, caches), _ = jax.lax.scan(
      body, (mix0, caches), jnp.arange(model.config.num_cond_tokens))
  return mix, caches


def _decode_informative(model, params, rng, mix, caches, opts,
                        keep_mixtures: bool):
  """The scan over `z_1^I ... z_N^I`; returns `(z_I [B,N,d_I], mixes, caches)`.

  `mixes` (if kept) are the mixtures each token was drawn from, `[S, B, N,
  ...]`.
  """
  token_fn = _prior_fn(model, params, "decode_token", (None, 0, None))
  n = model.num_tokens
  positions = model.config.num_cond_tokens + jnp.arange(n)

  def body(carry, xs):
    mix, caches = carry
    key, pos = xs
    z_i = draw(key, *_split_streams(mix), opts)  # [B, d_I]
    next_mix, caches = token_fn(z_i, caches, pos)
    return (next_mix, caches), (z_i, mix if keep_mixtures else None)

  (_, caches), (z_nbd, mixes) = jax.lax.scan(
      body, (mix, caches), (jax.random.split(rng, n), positions))
  if keep_mixtures:
    mixes = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 2), mixes)
  return jnp.swapaxes(z_nbd, 0, 1), mixes, caches


def _decode_redundant(model, params, rng, caches, opts):
  """Extra token -> shared `GMM_R`; draws every `z_i^R`: `([B,N,d_R], mix)`."""
  mix_r = _prior_fn(model, params, "decode_extra", 0)(caches)
  mix_c, mix_u = _split_streams(mix_r)
  # One token at a time (lax.map): guided candidates for all N tokens at
  # once would need N x the memory of one step.
  z_nbd = jax.lax.map(lambda key: draw(key, mix_c, mix_u, opts),
                      jax.random.split(rng, model.num_tokens))
  return jnp.swapaxes(z_nbd, 0, 1), mix_r


def _stream_labels(model, labels, opts):
  """`[S, B]`: the labels, and the null label when guidance is on."""
  null = model.config.num_classes
  if opts.guided and null > 0:
    return jnp.stack([labels, jnp.full_like(labels, null)])
  return labels[None]


def decode_latents(model: Farmer, params: Any, rng: jax.Array,
                   labels: jax.Array, opts: SamplingOptions,
                   keep_mixtures: bool = False):
  """AR-decodes latents with the FARMER prior; see `sample_latents`.

  Returns:
    `(z [B, N, d], mixtures)`; `mixtures` is a dict with `mix_I` (leading
    axes `[S, B, N]`: the mixture each `z_i^I` was drawn from, stream 0
    conditional, stream 1 unconditional when guided) and `mix_R` (`[S, B]`),
    or `None` unless `keep_mixtures`.
  """
  stream_labels = _stream_labels(model, labels, opts)
  s, b = stream_labels.shape
  cache = model.apply(params, b, method=lambda m, n: m.prior.init_cache(n))
  caches = jax.tree.map(lambda a: jnp.broadcast_to(a, (s,) + a.shape), cache)
  rng_i, rng_r = jax.random.split(rng)
  mix, caches = _prefill(model, params, stream_labels, caches)
  z, mix_i, caches = _decode_informative(model, params, rng_i, mix, caches,
                                         opts, keep_mixtures)
  mix_r = None
  if model.token_dim > model.config.d_I:
    z_r, mix_r = _decode_redundant(model, params, rng_r, caches, opts)
    z = jnp.concatenate([z, z_r], axis=-1)
  mixtures = dict(mix_I=mix_i, mix_R=mix_r) if keep_mixtures else None
  return z, mixtures


def sample_latents(model: Farmer, params: Any, rng: jax.Array,
                   labels: jax.Array, *, cfg_scale: float = 0.0,
                   num_candidates: int = 16, num_uncond_candidates: int = 0,
                   guidance: str = "resample", logit_temp: float = 1.0,
                   scale_temp: float = 1.0,
                   return_mixtures: bool = False):
  """Samples latents `z [B, N, d]` in the prior's token order (spec 6.1).

  Keyword options are static (bind them before `jax.jit`); they are the
  fields of `SamplingOptions`. The `gaussian` prior (TARFlow ablation) draws
  `scale_temp * N(0, I)`.

  Args:
    model: the `Farmer` module.
    params: its variables, `{'params': ...}`.
    rng: PRNG key.
    labels: `[B]` int class labels (any value for unconditional models).
    cfg_scale: guidance weight `w`.
    num_candidates: see `SamplingOptions`.
    num_uncond_candidates: see `SamplingOptions`.
    guidance: one of `GUIDANCE_RULES`.
    logit_temp: temperature on mixture logits.
    scale_temp: factor on mixture scales.
    return_mixtures: also return the mixtures used (see `decode_latents`).

  Returns:
    `z` float32 `[B, N, d]`, or `(z, mixtures)` with `return_mixtures`.
  """
  opts = SamplingOptions(cfg_scale, num_candidates, num_uncond_candidates,
                         guidance, logit_temp, scale_temp)
  if model.config.prior == "gaussian":
    shape = (labels.shape[0], model.num_tokens, model.token_dim)
    z, mixtures = scale_temp * jax.random.normal(rng, shape), None
  else:
    z, mixtures = decode_latents(model, params, rng, labels, opts,
                                 return_mixtures)
  return (z, mixtures) if return_mixtures else z


# --- Images -----------------------------------------------------------------


def tweedie_denoise(model: Farmer, params: Any, x: jax.Array,
                    labels: jax.Array, sigma: float) -> jax.Array:
  """One Tweedie step `x + sigma^2 grad_x log p(x | c)` (spec 6.3).

  `sigma` is the training noise std in `[-1, 1]` units. The gradient of the
  batch sum is each image's own gradient (images do not interact).
  """
  def total_log_prob(x):
    return jnp.sum(model.apply(params, x, labels, method=Farmer.log_prob))

  return x + sigma ** 2 * jax.grad(total_log_prob)(x)


def sample_images(model: Farmer, params: Any, rng: jax.Array,
                  labels: jax.Array, *, denoise_sigma: float = 0.0,
                  decode_fn: Optional[Callable] = None,
                  decoder_variables: Any = None, **kwargs) -> jax.Array:
  """Samples images `[B, H, W, C]` in `[-1, 1]` (spec section 6).

  Args:
    model: the `Farmer` module.
    params: its variables.
    rng: PRNG key.
    labels: `[B]` int.
    denoise_sigma: if > 0, one Tweedie step with this noise std before
      clipping.
    decode_fn: `decode_fn(decoder_variables, z, labels) -> x` in place of
      the exact flow inverse (the distilled one-step student, spec 8).
    decoder_variables: the variables `decode_fn` takes.
    **kwargs: options of `sample_latents`.

  Returns:
    float32 images clipped to `[-1, 1]`.
  """
  z = sample_latents(model, params, rng, labels, **kwargs)
  if decode_fn is None:
    x = model.apply(params, z, labels, method=Farmer.decode)
  else:
    x = decode_fn(decoder_variables, z, labels)
  if denoise_sigma > 0:
    x = tweedie_denoise(model, params, x, labels, denoise_sigma)
  return jnp.clip(x, -1.0, 1.0)


def to_uint8(x: jax.Array) -> jax.Array:
  """`[-1, 1]` images -> `uint8` `{0..255}` (inverse of `x / 127.5 - 1`)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

