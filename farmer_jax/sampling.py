"""Sampling from FARMER: KV-cached AR decoding, guidance, the AF inverse.

Spec sections 6-7. `sample_latents` decodes `z_1^I ... z_N^I` one token per
step of a single `lax.scan` with preallocated KV caches, then feeds the extra
token and draws every `z_i^R` from the shared mixture `GMM_R`.
`sample_images` runs the exact flow inverse (`Farmer.decode`) or another
decoder (the distilled student, the Jacobi decoder), an optional Tweedie
denoising step, and clips to `[-1, 1]`.

Classifier-free guidance keeps two streams, conditional (the labels) and
unconditional (the null label `num_classes`), each with its own KV cache; the
token chosen at each step is fed to both. The streams are stacked on a
leading axis of size 2 and the prior is `vmap`ped over it, so one traced
network step serves both and the batch axis stays where the caller sharded
it. Each AR step (and each `z_i^R` draw) applies one of the rules below to
the step's conditional and unconditional mixtures `p_c`, `p_u`. The guided
target is `p* ∝ p_c^{1+w} / p_u^w`, `w = cfg_scale`. `SamplingOptions` holds
every knob; the paper's names (Algorithm 1, Table 6) are in brackets.

* 'resample' (spec section 7, the default), three stages:
  - propose: `s_c` candidates from `p_c` and `s_u` from `p_u`
    [`num_candidates`, `num_uncond_candidates`], both drawn with the
    proposal temperatures: logits / `T_pi`, scales * `T_sigma`
    [`logit_temp`, `scale_temp`];
  - weigh: `p_c`, `p_u` evaluated with their own temperatures `T_pi_v`,
    `T_sigma_v` [`weigh_logit_temp`, `weigh_scale_temp`], `D = log p_c -
    log p_u`. `proposal='paper'` (Algorithm 1): `log w = w D` for candidates
    from `p_c` and `(w+1) D` for candidates from `p_u` (each is `p* / p_c`
    or `p* / p_u` up to one shared constant). `proposal='balance'`
    (ours): `log w = log p* - log q` with `p* ∝ p_u e^{(1+w) D}` from the
    weigh-tempered mixtures and the balance-heuristic proposal
    `q = (s_c p_c + s_u p_u) / (s_c + s_u)` from the proposal-tempered ones;
  - resample: one candidate with probability `softmax(T_s log w)`
    [`resample_temp`]; `T_s > 1` sharpens.
  As `s_c + s_u -> inf` (fixed ratio) the draw has the density
  `∝ sum_g s_g q_g(z) w_g(z)^{T_s}` over the two groups `g` (`q_g`: the
  group's proposal, `w_g` its weight function). With every temperature 1
  (`T_s` too) both rules make this `p*` exactly: self-normalised importance
  resampling, biased by O(1/s) at finite `s`. Otherwise they differ:
  'paper' keeps the proposal temperatures in the result (e.g. `s_u = 0`,
  `T_s = 1` gives `p_c^{T_pi,T_sigma} (p_c^v / p_u^v)^w`), while 'balance'
  divides the proposal out, so `T_pi`, `T_sigma` only change which
  candidates exist and, with `T_s = 1`, the result is `p*` of the
  weigh-tempered mixtures.
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
  The two component rules temper both mixtures with `T_pi`, `T_sigma` and
  have no weigh or resample stage.
* 'none', or `cfg_scale == 0`, or an unconditional model: plain conditional
  sampling with one stream, with `T_pi`, `T_sigma`.

The redundant channels (`draw(..., redundant=True)`) use the same rule
with their own counts `r_num_candidates`, `r_num_uncond_candidates` (the
paper: "larger", no value) and `r_var_scale`, a factor on the variance of
the mixtures `z^R` is drawn from (paper Figure 7: 0 .. 4): unguided, `GMM_R`
itself (0: the chosen component's mean); 'resample', the proposals (so
under 'balance' only 0, candidates at component means, changes the limit);
'rejection' / 'closed_form', the per-dimension guided Gaussian (0: its
mean).

The two component rules count their fallbacks (`draw_counted`; per image
through `sample_images(..., return_fallbacks=True)`), so callers report how
often the guided target was not sampled (`inference.generate`'s `stats`).

Everything is jittable with the options bound statically (e.g. with
`functools.partial`), deterministic given `rng`, and batch-parallel: no
operation mixes batch elements, so it shards over the data axis when the
caller jits it with sharded `labels`. The numbers that only enter the
arithmetic (`TRACEABLE`: the guidance weight, the temperatures,
`r_var_scale`) may also be jit arguments (`split_traceable`): a sweep over
them then compiles once. A zero `cfg_scale` or `r_var_scale` stays static,
since it changes the program (one stream; component means).
"""
import dataclasses
import math
import numbers
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from farmer_jax.config_lib import GUIDANCE_RULES
from farmer_jax.config_lib import PROPOSALS
from farmer_jax.models import Farmer
from farmer_jax.models import gmm

# Half-width, in proposal stds, of the window on which the 'rejection' rule
# bounds its density ratio; proposal mass outside it is ~2e-9.
_REJECTION_WINDOW = 6.0


def _option(default, help_text: str, choices: tuple = ()):
  """A `SamplingOptions` field; `help_text` and `choices` make its CLI flag."""
  return dataclasses.field(default=default,
                           metadata=dict(help=help_text, choices=choices))


def _count(low: int):
  """Check: an integer (not a bool) >= `low`."""
  return lambda v: (isinstance(v, numbers.Integral)
                    and not isinstance(v, bool) and v >= low)


def _number(ok):
  """Check: a finite real number (not a bool) for which `ok` holds."""
  return lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool)
                    and math.isfinite(v) and ok(v))


# Fields that only enter the arithmetic: they may be traced (jit arguments).
TRACEABLE = ("cfg_scale", "logit_temp", "scale_temp", "weigh_logit_temp",
             "weigh_scale_temp", "resample_temp", "r_var_scale")
# Of those, a static 0 takes another branch: one stream without guidance;
# `z^R` at its component means.
_ZERO_IS_STRUCTURAL = ("cfg_scale", "r_var_scale")


def _static(value) -> bool:
  """A Python / NumPy number, not a jax array or tracer."""
  return isinstance(value, numbers.Number)


def _static_zero(value) -> bool:
  return _static(value) and value == 0


def split_traceable(options: dict) -> Tuple[dict, dict]:
  """Options -> `(static, traced)`, after checking them.

  `traced` holds the `TRACEABLE` values, except a zero `cfg_scale` or
  `r_var_scale` (which changes the program), to pass to a jitted sampler as
  an argument; `static` holds the rest. `sample_latents(..., **static,
  **traced)` is `sample_latents(..., **options)`.
  """
  SamplingOptions(**options)
  traced = {k: float(v) for k, v in options.items() if k in TRACEABLE
            and not (k in _ZERO_IS_STRUCTURAL and v == 0)}
  static = {k: v for k, v in options.items() if k not in traced}
  return static, traced


# (field, check, what it must be): the checks of `SamplingOptions`.
_OPTION_CHECKS = (
    ("cfg_scale", _number(lambda v: v >= 0), "a number >= 0 (0: no guidance)"),
    ("guidance", lambda v: v in GUIDANCE_RULES, f"one of {GUIDANCE_RULES}"),
    ("num_candidates", _count(1), "an integer >= 1"),
    ("num_uncond_candidates", _count(0), "an integer >= 0"),
    ("logit_temp", _number(lambda v: v > 0), "a number > 0"),
    ("scale_temp", _number(lambda v: v > 0), "a number > 0"),
    ("weigh_logit_temp", _number(lambda v: v > 0), "a number > 0"),
    ("weigh_scale_temp", _number(lambda v: v > 0), "a number > 0"),
    ("resample_temp", _number(lambda v: v > 0), "a number > 0"),
    ("proposal", lambda v: v in PROPOSALS, f"one of {PROPOSALS}"),
    ("r_num_candidates", _count(1), "an integer >= 1"),
    ("r_num_uncond_candidates", _count(0), "an integer >= 0"),
    ("r_var_scale", _number(lambda v: v >= 0),
     "a number >= 0 (0: component means)"),
)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """Static options of one sampler (see the module docstring).

  Every field is also a key of `config.sample` (`inference.sampling_kwargs`
  passes them all) and a flag of `farmer_jax.sample` / `.evaluate`. The
  paper's names (Algorithm 1, Table 6) are in brackets.

  Attributes:
    cfg_scale: guidance weight [`w`]; 0 = plain conditional sampling.
    num_candidates: [`s_c`] 'resample': candidates from `p_c`; 'rejection':
      proposals tried per dimension (GIVT tries 1000; acceptance falls as
      `w` grows, and a dimension with none accepted falls back to `p_c`).
    num_uncond_candidates: [`s_u`] 'resample': candidates from `p_u`.
    guidance: one of `GUIDANCE_RULES`.
    logit_temp: [`T_pi`] temperature on the mixture logits that tokens (or
      'resample''s candidates) are drawn with; 1 = exact.
    scale_temp: [`T_sigma`] factor on those mixtures' scales; 1 = exact.
    weigh_logit_temp: [`T_pi_v`] 'resample': temperature on the logits of
      `p_c`, `p_u` as the weigh stage evaluates them.
    weigh_scale_temp: [`T_sigma_v`] 'resample': factor on their scales there.
    resample_temp: [`T_s`] 'resample': a candidate is picked with
      probability `softmax(T_s log w)`; > 1 sharpens.
    proposal: 'resample''s log-weights: 'paper' (Algorithm 1) or 'balance'
      (the balance heuristic); one of `PROPOSALS`.
    r_num_candidates: `s_c` of the redundant channels' draws.
    r_num_uncond_candidates: `s_u` of the redundant channels' draws.
    r_var_scale: factor on the variance of the mixtures `z^R` is drawn from
      (module docstring); 1 = exact, 0 = component means.
  """
  cfg_scale: float = _option(0.0, "Guidance weight w (0: none).")
  num_candidates: int = _option(
      16, "s_c: 'resample' candidates from p_c per step; 'rejection' tries.")
  num_uncond_candidates: int = _option(
      0, "s_u: 'resample' candidates from p_u per step.")
  guidance: str = _option("resample", "Guidance rule (spec 7).",
                          GUIDANCE_RULES)
  logit_temp: float = _option(
      1.0, "T_pi: logit temperature of sampling / proposals.")
  scale_temp: float = _option(
      1.0, "T_sigma: scale factor of sampling / proposals.")
  weigh_logit_temp: float = _option(
      1.0, "T_pi_v: logit temperature of p_c, p_u in the weigh stage.")
  weigh_scale_temp: float = _option(
      1.0, "T_sigma_v: scale factor of p_c, p_u in the weigh stage.")
  resample_temp: float = _option(
      1.0, "T_s: pick from softmax(T_s log w); > 1 sharpens.")
  proposal: str = _option(
      "paper", "'resample' weights: the paper's or the balance heuristic.",
      PROPOSALS)
  r_num_candidates: int = _option(
      16, "s_c of the redundant channels' draws.")
  r_num_uncond_candidates: int = _option(
      0, "s_u of the redundant channels' draws.")
  r_var_scale: float = _option(
      1.0, "Factor on the variance of z^R's mixture (0: component means).")

  def __post_init__(self):
    for name, ok, what in _OPTION_CHECKS:
      value = getattr(self, name)
      if name in TRACEABLE and not _static(value):
        continue  # traced: checked before tracing (`split_traceable`).
      if not ok(value):
        raise ValueError(
            f"sampling option {name}={value!r} must be {what}; set "
            f"config.sample.{name} (or --{name}) to such a value.")

  @property
  def guided(self) -> bool:
    """Two streams; a traced `cfg_scale` is a nonzero one."""
    return self.guidance != "none" and not _static_zero(self.cfg_scale)


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
                 cfg_scale: float, num_cond: int, num_uncond: int = 0, *,
                 weigh_c: Optional[gmm.Mixture] = None,
                 weigh_u: Optional[gmm.Mixture] = None,
                 proposal: str = "paper",
                 resample_temp: float = 1.0) -> jax.Array:
  """Resampling CFG (spec section 7, Algorithm 1): one draw per leading index.

  Args:
    rng: PRNG key.
    mix_c: the conditional proposal (proposal temperatures applied), any
      leading axes `[...]`.
    mix_u: the unconditional proposal, same shapes.
    cfg_scale: `w`.
    num_cond: `s_c`, candidates drawn from `mix_c`.
    num_uncond: `s_u`, candidates drawn from `mix_u`.
    weigh_c: `p_c` as the weigh stage evaluates it (weigh temperatures
      applied); None: `mix_c`.
    weigh_u: `p_u` likewise; None: `mix_u`.
    proposal: the log-weights, 'paper' or 'balance' (module docstring).
    resample_temp: `T_s`; a candidate is picked with probability
      `softmax(T_s log w)`.

  Returns:
    `[..., d]`; with the weigh mixtures equal to the proposals and
    `T_s = 1`, approximately distributed as `p_c^{1+w} / p_u^w` (exact as
    `num_cond + num_uncond -> inf`).
  """
  weigh_c = mix_c if weigh_c is None else weigh_c
  weigh_u = mix_u if weigh_u is None else weigh_u
  rng_c, rng_u, rng_pick = jax.random.split(rng, 3)
  cands = [_draws(rng_c, mix_c, num_cond)]
  if num_uncond:
    cands.append(_draws(rng_u, mix_u, num_uncond))
  z = jnp.concatenate(cands, axis=0)  # [S, ..., d]
  logp_c, logp_u = gmm.log_prob(z, weigh_c), gmm.log_prob(z, weigh_u)
  w = cfg_scale
  if proposal == "paper":
    # p* / p_c ∝ (p_c / p_u)^w and p* / p_u ∝ (p_c / p_u)^(w+1), with the
    # same constant: one weight function per candidate group.
    from_u = jnp.arange(num_cond + num_uncond) >= num_cond
    coef = jnp.where(from_u, w + 1.0, w).reshape((-1,) + (1,) * (z.ndim - 2))
    log_w = coef * (logp_c - logp_u)
  else:  # 'balance': p* / q with q the mixture of both proposals.
    log_target = logp_u + (1.0 + w) * (logp_c - logp_u)
    q_c = logp_c if weigh_c is mix_c else gmm.log_prob(z, mix_c)
    q_u = logp_u if weigh_u is mix_u else gmm.log_prob(z, mix_u)
    total = num_cond + num_uncond
    log_q = q_c if not num_uncond else jnp.logaddexp(
        math.log(num_cond / total) + q_c, math.log(num_uncond / total) + q_u)
    log_w = log_target - log_q
  pick = jax.random.categorical(rng_pick, resample_temp * log_w, axis=0)
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
                  cfg_scale: float, num_tries: int,
                  return_fallbacks: bool = False):
  """GIVT/JetFormer per-dimension rejection CFG (module docstring).

  Args:
    rng: PRNG key.
    mix_c: conditional mixture, leading axes `[...]`.
    mix_u: unconditional mixture, same shapes.
    cfg_scale: `w`.
    num_tries: proposals per dimension.
    return_fallbacks: also return how many dimensions accepted no try and
      fell back to `p_c`, `[...]` int32.

  Returns:
    `[..., d]`, or `(z, fallbacks)`.
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
  accepted = jnp.any(accept, axis=0)
  z = jnp.where(accepted, z, fallback)
  if return_fallbacks:
    return z, jnp.sum(~accepted, axis=-1, dtype=jnp.int32)
  return z


def closed_form_cfg(rng: jax.Array, mix_c: gmm.Mixture, mix_u: gmm.Mixture,
                    cfg_scale: float, noise_scale: float = 1.0,
                    return_fallbacks: bool = False):
  """Exact per-dimension CFG Gaussian on the paired component, `[..., d]`.

  `noise_scale` multiplies the Gaussian's std: the same as multiplying both
  mixtures' scales by it (the mean is unchanged), and 0 gives the mean.
  Where the target is improper (precision <= 0) the dimension falls back to
  `p_c`; `return_fallbacks` also returns how many did, `[...]` int32.
  """
  rng_k, rng_n = jax.random.split(rng)
  m_c, s_c, m_u, s_u = _paired_component(rng_k, mix_c, mix_u)
  w = cfg_scale
  prec = (1 + w) / s_c ** 2 - w / s_u ** 2
  proper = prec > 0
  safe = jnp.where(proper, prec, 1.0)
  mean = jnp.where(proper, ((1 + w) * m_c / s_c ** 2 - w * m_u / s_u ** 2)
                   / safe, m_c)
  scale = jnp.where(proper, jax.lax.rsqrt(safe), s_c)
  z = mean + noise_scale * scale * jax.random.normal(rng_n, m_c.shape)
  if return_fallbacks:
    return z, jnp.sum(~proper, axis=-1, dtype=jnp.int32)
  return z


def draw_counted(rng: jax.Array, mix_c: gmm.Mixture,
                 mix_u: Optional[gmm.Mixture], opts: SamplingOptions,
                 redundant: bool = False) -> Tuple[jax.Array, jax.Array]:
  """One token per leading index of the mixtures under `opts`.

  Args:
    rng: PRNG key.
    mix_c: the conditional mixture, any leading axes `[...]` (e.g. `[B]` for
      an AR step or a shared `GMM_R`, `[B, N]` for per-token mixtures).
    mix_u: the unconditional mixture with the same shapes; None: unguided.
    opts: the options.
    redundant: a draw of `z^R`: `r_num_candidates`,
      `r_num_uncond_candidates` and `r_var_scale` apply.

  Returns:
    `(z [..., d], fallbacks [...])`: fallbacks counts the dimensions where
    'rejection' accepted no try or 'closed_form' met an improper target,
    and fell back to `p_c` (0 for the other rules).
  """
  spread = 1.0
  if redundant:
    v = opts.r_var_scale
    spread = math.sqrt(v) if _static(v) else jnp.sqrt(v)
  none = jnp.zeros(mix_c.logits.shape[:-1], jnp.int32)
  if mix_u is None or not opts.guided:
    return gmm.sample(rng, mix_c, opts.logit_temp,
                      opts.scale_temp * spread), none
  w = opts.cfg_scale
  if opts.guidance == "resample":
    num_c, num_u = ((opts.r_num_candidates, opts.r_num_uncond_candidates)
                    if redundant else
                    (opts.num_candidates, opts.num_uncond_candidates))
    proposal_temps = (opts.logit_temp, opts.scale_temp * spread)
    weigh_temps = (opts.weigh_logit_temp, opts.weigh_scale_temp)
    propose = lambda m: temper(m, *proposal_temps)
    # None: the proposal itself ('balance' then needs two log-probs, not 4).
    same = all(_static(a) and _static(b) and a == b
               for a, b in zip(weigh_temps, proposal_temps))
    weigh = lambda m: None if same else temper(m, *weigh_temps)
    return resample_cfg(rng, propose(mix_c), propose(mix_u), w, num_c, num_u,
                        weigh_c=weigh(mix_c), weigh_u=weigh(mix_u),
                        proposal=opts.proposal,
                        resample_temp=opts.resample_temp), none
  if redundant and _static_zero(opts.r_var_scale):
    # The guided Gaussian's mean, both rules' limit.
    mix_c, mix_u = (temper(m, opts.logit_temp, opts.scale_temp)
                    for m in (mix_c, mix_u))
    return closed_form_cfg(rng, mix_c, mix_u, w, noise_scale=0.0,
                           return_fallbacks=True)
  mix_c, mix_u = (temper(m, opts.logit_temp, opts.scale_temp * spread)
                  for m in (mix_c, mix_u))
  if opts.guidance == "rejection":
    tries = opts.r_num_candidates if redundant else opts.num_candidates
    return rejection_cfg(rng, mix_c, mix_u, w, tries, return_fallbacks=True)
  return closed_form_cfg(rng, mix_c, mix_u, w, return_fallbacks=True)


def draw(rng: jax.Array, mix_c: gmm.Mixture, mix_u: Optional[gmm.Mixture],
         opts: SamplingOptions, redundant: bool = False) -> jax.Array:
  """`draw_counted` without the fallback count: `[..., d]`."""
  return draw_counted(rng, mix_c, mix_u, opts, redundant)[0]


# --- KV-cached AR decoding --------------------------------------------------


# The streams (conditional, unconditional) run as one batch: `[S, B, ...]`
# folds into `[B * S, ...]` (image-major, so a device's block of images
# stays its own: no communication when the batch is sharded) for the prior
# and its KV caches (`[L, B * S, H, T, Dh]`), and the mixtures unfold
# again. A `vmap` over the streams instead made the layer loop (which scans
# the caches' layer axis) and the cache writes move the stream axis,
# transposing the whole cache at every token: on TPU the 1.9B/p8 sampler
# held it twice (1.83 GiB against 1.06).


def _prior(model, params, name: str, *args):
  """`model.prior.<name>(*args)`."""
  return model.apply(params, *args,
                     method=lambda m, *a: getattr(m.prior, name)(*a))


def _fold(a: jax.Array) -> jax.Array:
  """`[S, B, ...]` -> `[B * S, ...]`."""
  return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def _unfold(tree, num_streams: int):
  """`[B * S, ...]` leaves -> `[S, B, ...]`."""
  return jax.tree.map(lambda a: jnp.swapaxes(
      a.reshape((-1, num_streams) + a.shape[1:]), 0, 1), tree)


def _per_stream(a: jax.Array, num_streams: int) -> jax.Array:
  """The same `[B, ...]` input for every stream: `[B * S, ...]`."""
  return jnp.repeat(a, num_streams, axis=0)


def _split_streams(mix: gmm.Mixture):
  """`[S, ...]` mixture -> `(mix_c, mix_u or None)`."""
  mix_c = jax.tree.map(lambda a: a[0], mix)
  mix_u = jax.tree.map(lambda a: a[1], mix) if mix.logits.shape[0] > 1 else None
  return mix_c, mix_u


def _prefill(model, params, stream_labels, caches):
  """Feeds the `r` cond tokens of each stream in one parallel pass (KV
  caches written); returns the mixture for `z_1^I` (`[S, B, ...]`) and the
  caches."""
  mix, caches = _prior(model, params, "prefill", _fold(stream_labels), caches)
  return _unfold(mix, stream_labels.shape[0]), caches


def _decode_informative(model, params, rng, mix, caches, opts,
                        keep_mixtures: bool):
  """The scan over `z_1^I ... z_N^I`.

  Returns `(z_I [B,N,d_I], mixes, caches, fallbacks [B])`; fallbacks: the
  guided draws that fell back to `p_c` (`draw_counted`), summed over tokens.

  `mixes` (if kept) are the mixtures each token was drawn from, `[S, B, N,
  ...]`.
  """
  num_streams = mix.logits.shape[0]

  def token_fn(z_i, caches, pos):
    next_mix, caches = _prior(model, params, "decode_token",
                              _per_stream(z_i, num_streams), caches, pos)
    return _unfold(next_mix, num_streams), caches

  n = model.num_tokens
  positions = model.config.num_cond_tokens + jnp.arange(n)

  def body(carry, xs):
    mix, caches = carry
    key, pos = xs
    z_i, fallbacks = draw_counted(key, *_split_streams(mix), opts)  # [B, d_I]
    next_mix, caches = token_fn(z_i, caches, pos)
    return (next_mix, caches), (z_i, fallbacks,
                                mix if keep_mixtures else None)

  (_, caches), (z_nbd, fallbacks_nb, mixes) = jax.lax.scan(
      body, (mix, caches), (jax.random.split(rng, n), positions))
  if keep_mixtures:
    mixes = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 2), mixes)
  return (jnp.swapaxes(z_nbd, 0, 1), mixes, caches,
          jnp.sum(fallbacks_nb, axis=0))


def _decode_redundant(model, params, rng, z_i, caches, opts,
                      num_streams: int):
  """Extra token -> `GMM_R`; draws every `z_i^R`: `([B,N,d_R], mix, fallbacks
  [B])`.

  `mix` has leading axes `[S, B]` (the paper's shared mixture) or `[S, B,
  N]` (`redundant_prior='token'`: one mixture per token, given `z_i^I`).
  """
  mix_r = _unfold(_prior(model, params, "decode_extra", caches,
                         _per_stream(z_i, num_streams)), num_streams)
  mix_c, mix_u = _split_streams(mix_r)
  per_token = mix_r.logits.ndim == 4  # [S, B, N, K]

  def token_mixture(mix, i):
    """Token `i`'s mixture: the shared one, or slice `i` of per-token ones."""
    if mix is None or not per_token:
      return mix
    return jax.tree.map(lambda a: a[:, i], mix)

  def draw_token(xs):
    key, i = xs
    # One token at a time (lax.map): guided candidates for all N tokens at
    # once would need N x the memory of one step.
    return draw_counted(key, token_mixture(mix_c, i), token_mixture(mix_u, i),
                        opts, redundant=True)

  n = model.num_tokens
  z_nbd, fallbacks_nb = jax.lax.map(
      draw_token, (jax.random.split(rng, n), jnp.arange(n)))
  return jnp.swapaxes(z_nbd, 0, 1), mix_r, jnp.sum(fallbacks_nb, axis=0)


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
    `(z [B, N, d], mixtures, fallbacks [B])`; fallbacks counts each
    image's guided draws (dimensions) that fell back to `p_c`
    (`draw_counted`); `mixtures` is a dict with `mix_I` (leading
    axes `[S, B, N]`: the mixture each `z_i^I` was drawn from, stream 0
    conditional, stream 1 unconditional when guided) and `mix_R` (`[S, B]`,
    or `[S, B, N]` with `redundant_prior='token'`),
    or `None` unless `keep_mixtures`.
  """
  stream_labels = _stream_labels(model, labels, opts)
  s, b = stream_labels.shape
  caches = model.apply(params, s * b,
                       method=lambda m, n: m.prior.init_cache(n))
  rng_i, rng_r = jax.random.split(rng)
  mix, caches = _prefill(model, params, stream_labels, caches)
  z, mix_i, caches, fallbacks = _decode_informative(
      model, params, rng_i, mix, caches, opts, keep_mixtures)
  mix_r = None
  if model.token_dim > model.config.d_I:
    z_r, mix_r, fallbacks_r = _decode_redundant(model, params, rng_r, z,
                                                caches, opts, s)
    z = jnp.concatenate([z, z_r], axis=-1)
    fallbacks = fallbacks + fallbacks_r
  mixtures = dict(mix_I=mix_i, mix_R=mix_r) if keep_mixtures else None
  return z, mixtures, fallbacks


def sample_latents(model: Farmer, params: Any, rng: jax.Array,
                   labels: jax.Array, *, return_mixtures: bool = False,
                   return_fallbacks: bool = False, **options):
  """Samples latents `z [B, N, d]` in the prior's token order (spec 6.1).

  The `gaussian` prior (TARFlow ablation) draws `scale_temp * N(0, I)`.

  Args:
    model: the `Farmer` module.
    params: its variables, `{'params': ...}`.
    rng: PRNG key.
    labels: `[B]` int class labels (any value for unconditional models).
    return_mixtures: also return the mixtures used (see `decode_latents`).
    return_fallbacks: also return each image's count of guided draws that
      fell back to `p_c` (`[B]` int32, see `decode_latents`), last.
    **options: fields of `SamplingOptions` (`cfg_scale`, `guidance`,
      `num_candidates`, ...), the rest at their defaults. Bind them before
      `jax.jit`; the `TRACEABLE` numbers may instead be jit arguments (see
      `split_traceable`).

  Returns:
    `z` float32 `[B, N, d]`, or a tuple `(z, [mixtures], [fallbacks])`
    with the ones asked for.
  """
  opts = SamplingOptions(**options)
  if model.config.prior == "gaussian":
    shape = (labels.shape[0], model.num_tokens, model.token_dim)
    z, mixtures = opts.scale_temp * jax.random.normal(rng, shape), None
    fallbacks = jnp.zeros(labels.shape, jnp.int32)
  else:
    z, mixtures, fallbacks = decode_latents(model, params, rng, labels, opts,
                                            return_mixtures)
  extra = (((mixtures,) if return_mixtures else ())
           + ((fallbacks,) if return_fallbacks else ()))
  return (z,) + extra if extra else z


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
                  decoder_variables: Any = None,
                  return_fallbacks: bool = False,
                  return_decode_stats: bool = False, **kwargs):
  """Samples images `[B, H, W, C]` in `[-1, 1]` (spec section 6).

  Args:
    model: the `Farmer` module.
    params: its variables.
    rng: PRNG key.
    labels: `[B]` int.
    denoise_sigma: if > 0, one Tweedie step with this noise std before
      clipping.
    decode_fn: `decode_fn(decoder_variables, z, labels) -> x` in place of
      the exact flow inverse (the distilled one-step student, spec 8), or
      `-> (x, stats)` with `stats` a dict of per-image arrays `[B, ...]`
      (the Jacobi decoder's iteration counts, `inference.JacobiDecoder`).
    decoder_variables: the variables `decode_fn` takes.
    return_fallbacks: also return each image's guidance fallback count.
    return_decode_stats: also return the decoder's `stats` (`{}` if none).
    **kwargs: options of `sample_latents`.

  Returns:
    float32 images clipped to `[-1, 1]`, or a tuple `(images, [fallbacks
    [B]], [stats])` with the ones asked for.
  """
  z, fallbacks = sample_latents(model, params, rng, labels,
                                return_fallbacks=True, **kwargs)
  stats = {}
  if decode_fn is None:
    x = model.apply(params, z, labels, method=Farmer.decode)
  else:
    x = decode_fn(decoder_variables, z, labels)
    if isinstance(x, tuple):
      x, stats = x
  if denoise_sigma > 0:
    x = tweedie_denoise(model, params, x, labels, denoise_sigma)
  x = jnp.clip(x, -1.0, 1.0)
  extra = (((fallbacks,) if return_fallbacks else ())
           + ((stats,) if return_decode_stats else ()))
  return (x,) + extra if extra else x
