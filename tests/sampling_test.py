"""Sampling (spec sections 6-7): cached decoding, the inverse, guidance.

The network tests use one tiny model with random non-zero weights; jitted
samplers are built once per module (`functools.cache`) and shared by the
asserts. The guidance rules are tested as pure functions of 1-D mixtures
against densities integrated on a grid.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import special
from scipy import stats

import helpers
from farmer_jax import nll, sampling
from farmer_jax.models import Farmer, gmm, unpatchify

jax.config.update("jax_default_matmul_precision", "highest")

# One per fake CPU device (conftest); 10 = num_classes is the null label.
LABELS = jnp.array([0, 3, 10, 7, 1, 9, 4, 3])


def tiny_config(**overrides):
  cfg = helpers.load_config().model
  cfg.update(image_size=8, channels=1, patch_size=2, af_blocks=2, af_width=16,
             af_heads=2, ar_width=16, ar_heads=2, ar_layers=2, d_I=2, K_I=3,
             K_R=3, num_cond_tokens=2)
  cfg.update(overrides)
  return cfg


@functools.cache
def tiny_model(redundant_prior="shared"):
  model = Farmer(tiny_config(redundant_prior=redundant_prior))
  params = helpers.init_random(model, jnp.zeros((1, 8, 8, 1)), LABELS[:1],
                               seed=1, scale=0.1)
  return model, params


@functools.cache
def sampler(fn_name, **kw):
  model, _ = tiny_model()
  return jax.jit(functools.partial(getattr(sampling, fn_name), model, **kw))


# --- The network: cached decoding and the inverse ---------------------------


@pytest.mark.parametrize("redundant_prior", ["shared", "token"])
def test_cached_prior_matches_teacher_forced_pass_and_is_deterministic(
    redundant_prior):
  """Per-step mixtures of both guidance streams == the parallel pass."""
  model, params = tiny_model(redundant_prior)
  sample = jax.jit(functools.partial(
      sampling.sample_latents, model, cfg_scale=2.0, num_candidates=4,
      num_uncond_candidates=2, return_mixtures=True))
  z, mixes = sample(params, jax.random.PRNGKey(0), LABELS)
  assert z.shape == (8, model.num_tokens, model.token_dim)
  forced = jax.jit(lambda z, l: model.apply(
      params, z, l, method=lambda m, z, l: m.prior(z, l)))
  null = jnp.full_like(LABELS, model.config.num_classes)
  for stream, labels in enumerate([LABELS, null]):
    mix_i, mix_r = forced(z, labels)
    for name in gmm.Mixture._fields:
      cached_i = getattr(mixes["mix_I"], name)[stream]
      cached_r = getattr(mixes["mix_R"], name)[stream]
      assert float(jnp.abs(cached_i - getattr(mix_i, name)).max()) <= 1e-5
      assert float(jnp.abs(cached_r - getattr(mix_r, name)).max()) <= 1e-5
  # The streams really differ (else the uncond check would be vacuous).
  assert float(jnp.abs(mixes["mix_I"].means[0]
                       - mixes["mix_I"].means[1]).max()) > 1e-3
  # Same seed: bitwise the same; another seed: every image differs.
  np.testing.assert_array_equal(
      z, sample(params, jax.random.PRNGKey(0), LABELS)[0])
  other = sample(params, jax.random.PRNGKey(1), LABELS)[0]
  assert float(jnp.abs(other - z).mean(axis=(1, 2)).min()) > 0.05


def naive_decode(model, params, z, labels):
  """`F^-1` with one full parallel pass of a block per recovered token."""
  cfg = model.config
  params_for = [jax.jit(lambda x, t=t: model.apply(
      params, x, labels,
      method=lambda m, x, l: m.flow.block_apply(t, 'params_for', x, l)))
                for t in range(cfg.af_blocks)]
  flip = cfg.terminal_permutation and cfg.af_blocks % 2 == 0
  x = z[:, ::-1] if flip else z  # the prior's order -> raster order
  for t in reversed(range(cfg.af_blocks)):
    y = x[:, ::-1] if t % 2 else x
    x = jnp.zeros_like(y)
    for i in range(y.shape[1]):  # x_i needs mu_i, s_i from x_<i only
      mu, s = params_for[t](x)
      x = x.at[:, i].set(y[:, i] * jnp.exp(s[:, i]) + mu[:, i])
    x = x[:, ::-1] if t % 2 else x
  s = cfg.image_size
  return unpatchify(x, cfg.patch_size, s, s)


def test_cached_decode_matches_uncached_recompute():
  model, params = tiny_model()
  assert model.config.terminal_permutation
  z = 0.7 * jax.random.normal(jax.random.PRNGKey(2),
                              (8, model.num_tokens, model.token_dim))
  cached = jax.jit(lambda z: model.apply(params, z, LABELS,
                                         method=Farmer.decode))(z)
  expected = naive_decode(model, params, z, LABELS)
  assert float(jnp.abs(expected - unpatchify(z, 2, 8, 8)).max()) > 0.5
  assert float(jnp.abs(cached - expected).max()) <= 1e-5


# --- Guidance rules on 1-D toys -----------------------------------------------

N_DRAWS = 20000
GRID = np.linspace(-8.0, 8.0, 16001)


C_TOY = ([0.3, 0.7], [-1.0, 1.5], [0.5, 0.7])  # (weights, means, scales)
U_TOY = ([0.5, 0.5], [-1.0, 1.0], [0.8, 1.0])


def toy_mixture(toy, n=N_DRAWS):
  weights, means, scales = toy
  mix = gmm.Mixture(jnp.log(jnp.array(weights)), jnp.array(means)[:, None],
                    jnp.array(scales)[:, None])
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), mix)


P_C, P_U = toy_mixture(C_TOY), toy_mixture(U_TOY)


def grid_density(toy, w=None, toy_u=None):
  """Normalised density of `toy` (or `toy^{1+w} / toy_u^w`) on GRID, scipy."""
  pdf = lambda t: sum(
      a * stats.norm.pdf(GRID, m, s) for a, m, s in zip(*t))
  log_p = np.log(pdf(toy))
  if w is not None:
    log_p = (1 + w) * log_p - w * np.log(pdf(toy_u))
  p = np.exp(log_p - log_p.max())
  return p / p.sum()


def moments(p):
  mean = np.sum(p * GRID)
  c = GRID - mean
  return mean, np.sum(p * c ** 2), np.sum(p * c ** 4)


def assert_moments(draws, p, bias=(0.0, 0.0)):
  """Mean and variance within 4 Monte-Carlo stds (+ a known bias bound).

  The std of a sample mean is `sqrt(var / n)`, that of a sample variance
  `sqrt((m4 - var^2) / n)`, both from the target's grid moments.
  """
  mean, var, m4 = moments(p)
  n = draws.shape[0]
  tol_mean = 4 * np.sqrt(var / n) + bias[0]
  tol_var = 4 * np.sqrt((m4 - var ** 2) / n) + bias[1]
  assert abs(draws.mean() - mean) <= tol_mean, (draws.mean(), mean, tol_mean)
  assert abs(draws.var() - var) <= tol_var, (draws.var(), var, tol_var)


def sir_bias(p_target, p_proposal, m):
  """Twice the first-order bias of resampling `m` candidates, per moment.

  Importance resampling returns the self-normalised IS estimate, whose
  bias is `-(1/m) E_p*[w (f - E_p* f)] + O(1/m^2)` with `w = p* / q`
  (Owen, Monte Carlo theory, section 9.2); doubled for the higher orders.
  """
  w = p_target / np.maximum(p_proposal, 1e-300)
  mean, var, _ = moments(p_target)
  f_mean, f_var = GRID - mean, (GRID - mean) ** 2 - var
  return tuple(2 / m * abs(np.sum(p_target * w * f)) for f in (f_mean, f_var))


# --- Algorithm 1's limit on d-dimensional toys -------------------------------
# Points are `[P, d]` grids; a toy is (weights, means [K(, d)], scales).

GRID_1D = GRID[:, None]
_AXIS_2D = np.linspace(-7.5, 7.5, 301)
GRID_2D = np.stack(np.meshgrid(_AXIS_2D, _AXIS_2D, indexing="ij"),
                   -1).reshape(-1, 2)
C_TOY_2D = ([0.4, 0.6], [[-1.0, 0.5], [1.2, -0.3]], [[0.6, 0.5], [0.7, 0.8]])
U_TOY_2D = ([0.5, 0.5], [[-0.8, 0.0], [0.8, 0.2]], [[0.9, 1.0], [1.0, 0.9]])


def toy_log_pdf(toy, points, logit_temp=1.0, scale_temp=1.0):
  """log density of the tempered toy at `points` (scipy): weights
  `∝ a^(1/T_pi)`, scales `* T_sigma`."""
  weights, means, scales = (np.asarray(a, np.float64) for a in toy)
  k = len(weights)
  log_a = np.log(weights) / logit_temp
  log_a -= special.logsumexp(log_a)
  comp = [np.sum(stats.norm.logpdf(points, m, s * scale_temp), axis=-1)
          for m, s in zip(means.reshape(k, -1), scales.reshape(k, -1))]
  return special.logsumexp(np.stack(comp) + log_a[:, None], axis=0)


def limit_groups(toy_c, toy_u, points, w, s_c, s_u, proposal, t_pi=1.0,
                 t_sigma=1.0, t_pi_v=1.0, t_sigma_v=1.0):
  """`(count, log proposal, log weight)` of each candidate group at `points`.

  Candidates come from the proposal-tempered toys; the weights use the
  weigh-tempered ones (`D = log p_c - log p_u`): 'paper' `w D` and
  `(w+1) D`, 'balance' `log p* - log q` with `q` the count-weighted mixture
  of the two proposals.
  """
  lq_c, lq_u = (toy_log_pdf(t, points, t_pi, t_sigma) for t in (toy_c, toy_u))
  lv_c, lv_u = (toy_log_pdf(t, points, t_pi_v, t_sigma_v)
                for t in (toy_c, toy_u))
  d = lv_c - lv_u
  if proposal == "paper":
    return [(s_c, lq_c, w * d), (s_u, lq_u, (w + 1) * d)]
  n = s_c + s_u
  log_q = lq_c if not s_u else np.logaddexp(np.log(s_c / n) + lq_c,
                                            np.log(s_u / n) + lq_u)
  log_w = lv_u + (1 + w) * d - log_q
  return [(s_c, lq_c, log_w), (s_u, lq_u, log_w)]


def limit_density(groups, t_s=1.0):
  """The resampled draw's density as the counts grow, normalised on the grid.

  A candidate `z_j` of group `g` is picked with probability `u_j / sum_k u_k`,
  `u = w^{T_s}`; the sum over `s_g` draws per group tends to
  `sum_g s_g E_{q_g}[u_g]`, so the pick has density
  `∝ sum_g s_g q_g(z) w_g(z)^{T_s}`.
  """
  log_p = special.logsumexp(np.stack([np.log(n) + lq + t_s * lw
                                      for n, lq, lw in groups if n]), axis=0)
  p = np.exp(log_p - log_p.max())
  return p / p.sum()


def moments_nd(p, points):
  """Per-dimension mean, variance and 4th central moment under `p`."""
  mean = p @ points
  c = points - mean
  return mean, p @ c ** 2, p @ c ** 4


def sir_bias_groups(groups, points, t_s=1.0):
  """Twice the first-order bias of the resampled mean and variance, `[d]`.

  The pick's expectation of `f` is that of `N / D`, `N = sum_j u_j f(z_j)`,
  `D = sum_j u_j`, over `s_g` independent candidates per group; the delta
  method gives the bias `-sum_g s_g Cov_g(u (f - E f), u) / E[D]^2` (for one
  group, Owen's `-(1/m) E_p*[w (f - E f)]` of `sir_bias`).
  """
  mean, var, _ = moments_nd(limit_density(groups, t_s), points)
  fs = (points - mean, (points - mean) ** 2 - var)
  shift = max(t_s * lw.max() for n, _, lw in groups if n)  # cancels
  e_d, num = 0.0, [0.0, 0.0]
  for n, lq, lw in groups:
    if not n:
      continue
    q = np.exp(lq - lq.max())
    q /= q.sum()
    u = np.exp(t_s * lw - shift)
    e_d += n * (q @ u)
    for i, f in enumerate(fs):
      num[i] = num[i] + n * ((q * u ** 2) @ f - ((q * u) @ f) * (q @ u))
  return tuple(2 * np.abs(x) / e_d ** 2 for x in num)


def moment_tolerances(p, points, n, bias):
  """4 Monte-Carlo stds of `n` draws' mean and variance, plus `bias`."""
  _, var, m4 = moments_nd(p, points)
  return 4 * np.sqrt(var / n) + bias[0], 4 * np.sqrt((m4 - var ** 2) / n) + (
      bias[1])


def assert_moments_nd(draws, p, points, bias):
  """Per-dimension mean and variance of `draws [n, d]` within tolerance."""
  mean, var, _ = moments_nd(p, points)
  tol_mean, tol_var = moment_tolerances(p, points, draws.shape[0], bias)
  np.testing.assert_array_less(np.abs(draws.mean(0) - mean), tol_mean)
  np.testing.assert_array_less(np.abs(draws.var(0) - var), tol_var)


def toy_mixture_nd(toy, n=N_DRAWS):
  """The toy as a `gmm.Mixture` broadcast to `n` leading indices."""
  weights, means, scales = (np.asarray(a, np.float32) for a in toy)
  k = len(weights)
  mix = gmm.Mixture(jnp.log(weights), jnp.asarray(means.reshape(k, -1)),
                    jnp.asarray(scales.reshape(k, -1)))
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), mix)


@functools.cache
def _jitted_draw(static_items, redundant):
  def fn(rng, mix_c, mix_u, traced):
    opts = sampling.SamplingOptions(**dict(static_items), **traced)
    return sampling.draw(rng, mix_c, mix_u, opts, redundant)
  return jax.jit(fn)


def draw_fn(opts, redundant=False):
  """`sampling.draw` jitted as `inference` jits the sampler: the numbers of
  `sampling.TRACEABLE` are arguments, so options that differ only in them
  share one compiled program."""
  static, traced = sampling.split_traceable(dataclasses.asdict(opts))
  fn = _jitted_draw(tuple(sorted(static.items())), redundant)
  return lambda rng, mix_c, mix_u: fn(rng, mix_c, mix_u, traced)


resample_fn = jax.jit(sampling.resample_cfg, static_argnums=(4, 5),
                      static_argnames=("proposal",))


@pytest.mark.parametrize("w,num_uncond", [(0.5, 0), (2.0, 0), (2.0, 64)])
def test_resampling_cfg_matches_guided_density(w, num_uncond):
  m = 256
  z = np.asarray(resample_fn(jax.random.PRNGKey(0), P_C, P_U, w, m,
                             num_uncond, proposal="balance"))[:, 0]
  target = grid_density(C_TOY, w, U_TOY)
  p_c, p_u = grid_density(C_TOY), grid_density(U_TOY)
  q = (m * p_c + num_uncond * p_u) / (m + num_uncond)
  assert_moments(z, target, sir_bias(target, q, m + num_uncond))
  # Guidance visibly moves the distribution (it is not just p_c).
  assert abs(z.mean() - moments(p_c)[0]) > 0.2


@pytest.mark.parametrize("proposal,num_uncond", [
    ("paper", 0), ("paper", 64), ("balance", 64)])
def test_resampling_cfg_at_zero_scale_is_conditional_sampling(proposal,
                                                              num_uncond):
  """w = 0, temperatures 1: p* = p_c, also from candidates of p_u."""
  z = np.asarray(resample_fn(jax.random.PRNGKey(1), P_C, P_U, 0.0, 256,
                             num_uncond, proposal=proposal))[:, 0]
  direct = np.asarray(gmm.sample(jax.random.PRNGKey(2), P_C))[:, 0]
  groups = limit_groups(C_TOY, U_TOY, GRID_1D, 0.0, 256, num_uncond, proposal)
  assert_moments(z, grid_density(C_TOY),
                 [b[0] for b in sir_bias_groups(groups, GRID_1D)])
  assert_moments(direct, grid_density(C_TOY))
  assert stats.ks_2samp(z, direct).pvalue > 1e-3


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_component_rules_match_gaussian_target(w):
  """One component: the per-dimension target is a known Gaussian."""
  toy_c, toy_u = ([1.0], [0.5], [0.8]), ([1.0], [-0.5], [1.0])
  p_c, p_u = toy_mixture(toy_c), toy_mixture(toy_u)
  target = grid_density(toy_c, w, toy_u)
  rng = jax.random.PRNGKey(3)
  rejection = jax.jit(sampling.rejection_cfg, static_argnums=4)(
      rng, p_c, p_u, w, 64)
  closed = jax.jit(sampling.closed_form_cfg)(rng, p_c, p_u, w)
  for z in (rejection, closed):
    assert_moments(np.asarray(z)[:, 0], target)


# --- Algorithm 1 through `draw`: every knob ---------------------------------

# (T_pi, T_sigma, T_pi_v, T_sigma_v, T_s): exact; weigh temperatures of their
# own; a sharpened pick; Table 6's kind of setting.
TEMPERATURES = [(1.0, 1.0, 1.0, 1.0, 1.0), (1.0, 0.9, 0.5, 0.9, 1.0),
                (1.0, 1.0, 1.0, 1.0, 1.5), (0.8, 0.9, 0.2, 0.9, 1.1)]
TOYS = {1: (C_TOY, U_TOY, GRID_1D), 2: (C_TOY_2D, U_TOY_2D, GRID_2D)}


def test_resampling_limit_at_unit_temperatures_is_the_guided_density():
  """The docstring's claim, on the grid: both rules' limit is `p*`."""
  for proposal in sampling.PROPOSALS:
    for s_u in (0, 64):
      groups = limit_groups(C_TOY, U_TOY, GRID_1D, 1.5, 128, s_u, proposal)
      np.testing.assert_allclose(limit_density(groups),
                                 grid_density(C_TOY, 1.5, U_TOY), atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("proposal", ["paper", "balance"])
@pytest.mark.parametrize("temps", TEMPERATURES,
                         ids=["-".join(map(str, t)) for t in TEMPERATURES])
def test_resampled_draws_match_their_limit(dim, proposal, temps):
  """Moments of 20k guided draws == the grid-integrated limit density."""
  t_pi, t_sigma, t_pi_v, t_sigma_v, t_s = temps
  toy_c, toy_u, points = TOYS[dim]
  w, s_c, s_u = 1.5, 128, 128
  opts = sampling.SamplingOptions(
      cfg_scale=w, num_candidates=s_c, num_uncond_candidates=s_u,
      logit_temp=t_pi, scale_temp=t_sigma, weigh_logit_temp=t_pi_v,
      weigh_scale_temp=t_sigma_v, resample_temp=t_s, proposal=proposal)
  with helpers.optimized():  # 20k draws: run time, not compile time
    z = np.asarray(draw_fn(opts)(jax.random.PRNGKey(dim),
                                 toy_mixture_nd(toy_c), toy_mixture_nd(toy_u)))
  groups = limit_groups(toy_c, toy_u, points, w, s_c, s_u, proposal,
                        t_pi, t_sigma, t_pi_v, t_sigma_v)
  target = limit_density(groups, t_s)
  bias = sir_bias_groups(groups, points, t_s)
  assert_moments_nd(z, target, points, bias)
  # The test can fail: the limit is not the unguided p_c, nor (unless every
  # temperature is 1) the guided density p* itself.
  tol_mean, tol_var = moment_tolerances(target, points, z.shape[0], bias)
  others = [toy_log_pdf(toy_c, points)]
  if temps != TEMPERATURES[0]:
    others.append(np.log(limit_density(limit_groups(
        toy_c, toy_u, points, w, s_c, s_u, proposal))))
  mean, var, _ = moments_nd(target, points)
  for log_p in others:
    p = np.exp(log_p - log_p.max())
    other_mean, other_var, _ = moments_nd(p / p.sum(), points)
    assert np.any((np.abs(other_mean - mean) > 2 * tol_mean)
                  | (np.abs(other_var - var) > 2 * tol_var))


def gaussian_limit(m_c, s_c, m_u, s_u, w, t_s=1.0, var_factor=1.0):
  """Mean and variance of `N(m_c, var_factor s_c^2) (N_c / N_u)^{w T_s}`."""
  prec = 1 / (var_factor * s_c ** 2) + w * t_s * (1 / s_c ** 2 - 1 / s_u ** 2)
  lin = m_c / (var_factor * s_c ** 2) + w * t_s * (m_c / s_c ** 2
                                                   - m_u / s_u ** 2)
  return lin / prec, 1 / prec


ONE_C, ONE_U = ([1.0], [0.5], [0.8]), ([1.0], [-0.5], [1.0])


def test_resample_temp_sharpens():
  """One Gaussian each ('paper', `s_u = 0`): the limit is Gaussian with
  precision growing in `T_s`; the draws' variance falls with it."""
  variances = []
  for t_s in (1.0, 2.0, 4.0):
    opts = sampling.SamplingOptions(cfg_scale=1.0, num_candidates=256,
                                    resample_temp=t_s)
    z = np.asarray(draw_fn(opts)(jax.random.PRNGKey(5), toy_mixture_nd(ONE_C),
                                 toy_mixture_nd(ONE_U)))[:, 0]
    groups = limit_groups(ONE_C, ONE_U, GRID_1D, 1.0, 256, 0, "paper")
    mean, var = gaussian_limit(0.5, 0.8, -0.5, 1.0, 1.0, t_s)
    np.testing.assert_allclose(
        moments_nd(limit_density(groups, t_s), GRID_1D)[:2], [[mean], [var]],
        atol=1e-9)
    assert_moments_nd(z[:, None], limit_density(groups, t_s), GRID_1D,
                      sir_bias_groups(groups, GRID_1D, t_s))
    variances.append(z.var())
  assert variances[0] > variances[1] > variances[2], variances


def test_zero_guidance_is_plain_sampling():
  """w = 0 takes the unguided path whatever the other knobs: bitwise
  `gmm.sample` with the proposal temperatures (and `r_var_scale` for z^R)."""
  opts = sampling.SamplingOptions(
      cfg_scale=0.0, num_uncond_candidates=4, logit_temp=0.7, scale_temp=0.8,
      weigh_logit_temp=0.2, resample_temp=3.0, proposal="balance",
      r_var_scale=0.25)
  rng, mix_c, mix_u = jax.random.PRNGKey(6), toy_mixture_nd(C_TOY_2D), (
      toy_mixture_nd(U_TOY_2D))
  plain = jax.jit(gmm.sample, static_argnums=(2, 3))
  np.testing.assert_array_equal(draw_fn(opts)(rng, mix_c, mix_u),
                                plain(rng, mix_c, 0.7, 0.8))
  np.testing.assert_array_equal(draw_fn(opts, True)(rng, mix_c, mix_u),
                                plain(rng, mix_c, 0.7, 0.4))


def random_mixture(key, shape, k, d):
  keys = jax.random.split(key, 3)
  return gmm.Mixture(jax.random.normal(keys[0], shape + (k,)),
                     2 * jax.random.normal(keys[1], shape + (k, d)),
                     0.3 + jax.random.uniform(keys[2], shape + (k, d)))


def guided_component_means(mix_c, mix_u, w):
  """Per component, the mean of `N_c^{1+w} / N_u^w` (or `m_c` if improper)."""
  m_c, s_c, m_u, s_u = (np.asarray(a, np.float64) for a in (
      mix_c.means, mix_c.scales, mix_u.means, mix_u.scales))
  prec = (1 + w) / s_c ** 2 - w / s_u ** 2
  mean = ((1 + w) * m_c / s_c ** 2 - w * m_u / s_u ** 2) / np.where(
      prec > 0, prec, 1.0)
  return np.where(prec > 0, mean, m_c)


@pytest.mark.parametrize("guidance,proposal", [
    ("none", "paper"), ("resample", "paper"), ("resample", "balance"),
    ("rejection", "paper"), ("closed_form", "paper")])
def test_zero_r_var_scale_gives_component_means(guidance, proposal):
  """z^R draws with `r_var_scale = 0` over leading axes `[B, N]`: each is a
  component mean (of p_c; of p_c or p_u for 'resample'; the guided
  Gaussian's for the component rules)."""
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  mix_c, mix_u = (random_mixture(k, (4, 5), 3, 2) for k in keys[:2])
  w = 2.0
  opts = sampling.SamplingOptions(
      cfg_scale=w, guidance=guidance, proposal=proposal, scale_temp=0.7,
      r_num_candidates=8, r_num_uncond_candidates=8, r_var_scale=0.0)
  z = np.asarray(draw_fn(opts, True)(keys[2], mix_c, mix_u))  # [4, 5, 2]
  assert z.shape == (4, 5, 2)
  means = {"none": [mix_c.means], "resample": [mix_c.means, mix_u.means]}.get(
      guidance, [guided_component_means(mix_c, mix_u, w)])
  means = np.concatenate([np.asarray(m) for m in means], axis=-2)
  nearest = np.abs(z[..., None, :] - means).max(-1).argmin(-1)
  # float32 vs float64 (the guided means divide by a precision near 0 where
  # the two components nearly cancel).
  np.testing.assert_allclose(
      z, np.take_along_axis(means, nearest[..., None, None], -2)[..., 0, :],
      rtol=1e-4, atol=1e-5)
  # Informative draws (redundant=False) ignore r_var_scale: not at means.
  z_i = np.asarray(draw_fn(opts)(keys[2], mix_c, mix_u))
  assert np.abs(z_i[..., None, :] - means).max(-1).min(-1).min() > 1e-4


@pytest.mark.parametrize("r_var_scale", [0.25, 4.0])
def test_r_var_scale_scales_the_variance_of_z_r(r_var_scale):
  """One Gaussian each. Unguided: `N(m, r s^2)`. 'paper' resampling: the
  proposal's variance is scaled, the weights are not; its limit is a
  Gaussian in closed form."""
  mix_c, mix_u = toy_mixture_nd(ONE_C), toy_mixture_nd(ONE_U)
  for w in (0.0, 1.0):
    opts = sampling.SamplingOptions(cfg_scale=w, r_num_candidates=256,
                                    r_var_scale=r_var_scale)
    z = np.asarray(draw_fn(opts, True)(jax.random.PRNGKey(8), mix_c, mix_u))
    groups = limit_groups(ONE_C, ONE_U, GRID_1D, w, 256, 0, "paper",
                          t_sigma=np.sqrt(r_var_scale))
    target = limit_density(groups)
    mean, var = gaussian_limit(0.5, 0.8, -0.5, 1.0, w, var_factor=r_var_scale)
    np.testing.assert_allclose(moments_nd(target, GRID_1D)[:2],
                               [[mean], [var]], rtol=1e-4)
    assert_moments_nd(z, target, GRID_1D, sir_bias_groups(groups, GRID_1D))


def test_redundant_draws_use_their_own_candidate_counts():
  """`r_num_candidates = 1` makes z^R draws plain p_c samples, while the
  informative draws (256 candidates) follow p*."""
  opts = sampling.SamplingOptions(cfg_scale=2.0, num_candidates=256,
                                  r_num_candidates=1)
  rng = jax.random.PRNGKey(9)
  z_r = np.asarray(draw_fn(opts, True)(rng, P_C, P_U))[:, 0]
  z_i = np.asarray(draw_fn(opts)(rng, P_C, P_U))[:, 0]
  assert_moments(z_r, grid_density(C_TOY))
  groups = limit_groups(C_TOY, U_TOY, GRID_1D, 2.0, 256, 0, "paper")
  assert_moments(z_i, grid_density(C_TOY, 2.0, U_TOY),
                 [b[0] for b in sir_bias_groups(groups, GRID_1D)])


@pytest.mark.parametrize("field,value", [
    ("cfg_scale", -1.0), ("cfg_scale", float("nan")), ("num_candidates", 0),
    ("num_candidates", 2.5), ("num_uncond_candidates", -1),
    ("guidance", "cfg"), ("logit_temp", 0.0), ("scale_temp", -1.0),
    ("weigh_logit_temp", 0.0), ("weigh_scale_temp", float("inf")),
    ("resample_temp", 0.0), ("proposal", "jet"), ("r_num_candidates", 0),
    ("r_num_uncond_candidates", -2), ("r_var_scale", -0.5)])
def test_sampling_options_name_the_bad_field(field, value):
  with pytest.raises(ValueError, match=f"sampling option {field}=.*must be"
                     f".*config.sample.{field}"):
    sampling.SamplingOptions(**{field: value})


# --- End to end ---------------------------------------------------------------


def test_sample_latents_takes_every_option_and_r_var_scale_reaches_z_r():
  """Every `SamplingOptions` field reaches the decoder; with `r_var_scale =
  0` each `z_i^R` is a component mean of `GMM_R` (of either stream)."""
  model, params = tiny_model()
  z, mixes = sampler(
      "sample_latents", cfg_scale=2.0, num_candidates=3,
      num_uncond_candidates=2, logit_temp=0.9, scale_temp=0.8,
      weigh_logit_temp=0.5, weigh_scale_temp=0.9, resample_temp=1.5,
      proposal="balance", r_num_candidates=4, r_num_uncond_candidates=3,
      r_var_scale=0.0, return_mixtures=True)(params, jax.random.PRNGKey(0),
                                             LABELS)
  b, n, d_r = 8, model.num_tokens, model.token_dim - model.config.d_I
  means = np.asarray(mixes["mix_R"].means)  # [S, B, (N,) K, d_R]
  if means.ndim == 4:  # one shared mixture per image
    means = np.broadcast_to(means[:, :, None], (2, b, n) + means.shape[2:])
  means = np.moveaxis(means, 0, 2).reshape(b, n, -1, d_r)  # [B, N, S*K, d_R]
  z_r = np.asarray(z[..., model.config.d_I:])
  np.testing.assert_allclose(
      np.abs(z_r[:, :, None] - means).max(-1).min(-1), 0.0, atol=1e-6)
  assert float(jnp.abs(z[..., :model.config.d_I]).std()) > 0.1


def test_images_in_range_with_rejection_cfg():
  x = sampler("sample_images", cfg_scale=1.0, guidance="rejection",
              num_candidates=8)(tiny_model()[1], jax.random.PRNGKey(0), LABELS)
  assert x.shape == (8, 8, 8, 1) and x.dtype == jnp.float32
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  assert float(x.std()) > 0.05
  u8 = nll.to_uint8(x)
  assert u8.dtype == jnp.uint8
  np.testing.assert_array_equal(nll.to_uint8(nll.to_model_range(u8)), u8)


def test_closed_form_cfg_samples():
  model, params = tiny_model()
  z = sampler("sample_latents", cfg_scale=2.0, guidance="closed_form")(
      params, jax.random.PRNGKey(0), LABELS)
  assert z.shape == (8, model.num_tokens, model.token_dim)
  assert bool(jnp.all(jnp.isfinite(z)))


def test_unconditional_model_samples_without_guidance():
  model = Farmer(tiny_config(num_classes=0))
  params = tiny_model()[1]  # the same weights with only the null embedding
  emb = params["params"]["prior"]["class_emb"]["embedding"]
  params = jax.tree.map(lambda a: a, params)
  params["params"]["prior"]["class_emb"]["embedding"] = emb[-1:]
  z, mixes = jax.jit(functools.partial(
      sampling.sample_latents, model, cfg_scale=3.0, return_mixtures=True))(
          params, jax.random.PRNGKey(0), jnp.zeros(8, jnp.int32))
  assert mixes["mix_I"].logits.shape[:2] == (1, 8)  # one stream: unguided
  assert bool(jnp.all(jnp.isfinite(z))) and float(z.std()) > 0.1


def test_gaussian_prior_images_with_tweedie_step():
  """Zero flow heads (the identity up to the terminal token reversal) and an
  N(0, I) prior: grad log p(x) = -x, so the Tweedie step gives (1 - s^2) x."""
  model = Farmer(tiny_config(prior="gaussian"))
  zero_heads = lambda path, a: (jnp.zeros_like(a) if path[-2].key == "head"
                                else a)
  params = {"params": {"flow": jax.tree_util.tree_map_with_path(
      zero_heads, tiny_model()[1]["params"]["flow"])}}
  labels, rng = LABELS[:2], jax.random.PRNGKey(0)
  x = jax.jit(functools.partial(sampling.sample_images, model,
                                denoise_sigma=0.1, scale_temp=0.5))(
                                    params, rng, labels)
  z = sampling.sample_latents(model, params, rng, labels, scale_temp=0.5)
  expected = jnp.clip(0.99 * unpatchify(z[:, ::-1], 2, 8, 8), -1, 1)
  assert float(jnp.abs(z).max()) > 1.0  # the clip is exercised
  np.testing.assert_allclose(x, expected, atol=1e-6)


def test_sampling_shards_over_the_batch_without_communication():
  model, params = tiny_model()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  fn = jax.jit(functools.partial(sampling.sample_latents, model, cfg_scale=2.0,
                                 num_candidates=4, num_uncond_candidates=2),
               in_shardings=(replicated, replicated, batch),
               out_shardings=batch)
  args = (params, jax.random.PRNGKey(0), jax.device_put(LABELS, batch))
  hlo = fn.lower(*args).compile().as_text()
  for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute",
             "reduce-scatter"):
    assert op not in hlo, op
  z = fn(*args)
  assert len(z.sharding.device_set) == jax.device_count()
  unsharded, _ = sampler("sample_latents", cfg_scale=2.0, num_candidates=4,
                         num_uncond_candidates=2, return_mixtures=True)(
                             params, jax.random.PRNGKey(0), LABELS)
  np.testing.assert_allclose(z, unsharded, atol=1e-5)


# --- Guidance fallbacks are counted -----------------------------------------


def test_closed_form_counts_improper_targets():
  """Precision `(1+w)/s_c^2 - w/s_u^2`: 2/1 - 1/0.25 < 0 (improper, every
  dimension falls back) for s_u = 0.5; 3/0.64 - 2/1 > 0 (none) below."""
  improper = toy_mixture(([1.0], [0.0], [1.0])), toy_mixture(
      ([1.0], [0.0], [0.5]))
  proper = toy_mixture(([1.0], [0.5], [0.8])), toy_mixture(
      ([1.0], [-0.5], [1.0]))
  fn = jax.jit(functools.partial(sampling.closed_form_cfg,
                                 return_fallbacks=True), static_argnums=3)
  _, counts = fn(jax.random.PRNGKey(0), *improper, 1.0)
  assert counts.shape == (N_DRAWS,) and int(counts.sum()) == N_DRAWS
  _, counts = fn(jax.random.PRNGKey(0), *proper, 2.0)
  assert int(counts.sum()) == 0


def test_rejection_fallback_rate_is_the_closed_form():
  """Target = p_c (identical mixtures): the ratio to the proposal
  N(m_c, 2 s_c) peaks at 2, so one try is accepted with probability 1/2
  and a dimension falls back with probability 1/2 (0.5^64 with 64 tries)."""
  same = toy_mixture(([1.0], [0.3], [0.7]))
  fn = jax.jit(functools.partial(sampling.rejection_cfg,
                                 return_fallbacks=True), static_argnums=(3, 4))
  _, one = fn(jax.random.PRNGKey(1), same, same, 2.0, 1)
  _, many = fn(jax.random.PRNGKey(1), same, same, 2.0, 64)
  rate = float(one.mean())
  assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / N_DRAWS), rate
  assert int(many.sum()) == 0


def test_sampler_reports_fallbacks_per_image():
  z, counts = sampler("sample_latents", cfg_scale=3.0, guidance="closed_form",
                      return_fallbacks=True)(
      tiny_model()[1], jax.random.PRNGKey(0), LABELS)
  model = tiny_model()[0]
  assert counts.shape == (8,) and counts.dtype == jnp.int32
  assert 0 <= int(counts.min()) and int(counts.max()) <= (
      model.num_tokens * model.token_dim)
  z_plain = sampler("sample_latents", cfg_scale=3.0, guidance="closed_form")(
      tiny_model()[1], jax.random.PRNGKey(0), LABELS)
  # The same draws: counting takes no randomness. Not bitwise: the two
  # programs compile apart, and closed-form CFG's precision (1 + w) / s_c^2
  # - w / s_u^2 magnifies rounding differences (measured 1.2e-4 at w = 3);
  # another key would move every draw by O(1).
  np.testing.assert_allclose(z, z_plain, rtol=0, atol=1e-3)
