"""Sampling (spec sections 6-7): cached decoding, the inverse, guidance.

The network tests use one tiny model with random non-zero weights; jitted
samplers are built once per module (`functools.cache`) and shared by the
asserts. The guidance rules are tested as pure functions of 1-D mixtures
against densities integrated on a grid.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
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
def tiny_model():
  model = Farmer(tiny_config())
  params = helpers.init_random(model, jnp.zeros((1, 8, 8, 1)), LABELS[:1],
                               seed=1, scale=0.1)
  return model, params


@functools.cache
def sampler(fn_name, **kw):
  model, _ = tiny_model()
  return jax.jit(functools.partial(getattr(sampling, fn_name), model, **kw))


# --- The network: cached decoding and the inverse ---------------------------


def test_cached_prior_matches_teacher_forced_pass_and_is_deterministic():
  """Per-step mixtures of both guidance streams == the parallel pass."""
  model, params = tiny_model()
  sample = sampler("sample_latents", cfg_scale=2.0, num_candidates=4,
                   num_uncond_candidates=2, return_mixtures=True)
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
      method=lambda m, x, l: m.flow.blocks[t].params_for(x, l)))
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


resample_fn = jax.jit(sampling.resample_cfg, static_argnums=(4, 5))


@pytest.mark.parametrize("w,num_uncond", [(0.5, 0), (2.0, 0), (2.0, 64)])
def test_resampling_cfg_matches_guided_density(w, num_uncond):
  m = 256
  z = np.asarray(resample_fn(jax.random.PRNGKey(0), P_C, P_U, w, m,
                             num_uncond))[:, 0]
  target = grid_density(C_TOY, w, U_TOY)
  p_c, p_u = grid_density(C_TOY), grid_density(U_TOY)
  q = (m * p_c + num_uncond * p_u) / (m + num_uncond)
  assert_moments(z, target, sir_bias(target, q, m + num_uncond))
  # Guidance visibly moves the distribution (it is not just p_c).
  assert abs(z.mean() - moments(p_c)[0]) > 0.2


def test_resampling_cfg_at_zero_scale_is_conditional_sampling():
  z = np.asarray(resample_fn(jax.random.PRNGKey(1), P_C, P_U, 0.0, 256,
                             0))[:, 0]
  direct = np.asarray(gmm.sample(jax.random.PRNGKey(2), P_C))[:, 0]
  assert_moments(z, grid_density(C_TOY))
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


# --- End to end ---------------------------------------------------------------


def test_images_in_range_with_rejection_cfg():
  x = sampler("sample_images", cfg_scale=1.0, guidance="rejection",
              num_candidates=8)(tiny_model()[1], jax.random.PRNGKey(0), LABELS)
  assert x.shape == (8, 8, 8, 1) and x.dtype == jnp.float32
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  assert float(x.std()) > 0.05
  u8 = sampling.to_uint8(x)
  assert u8.dtype == jnp.uint8
  np.testing.assert_array_equal(sampling.to_uint8(nll.to_model_range(u8)), u8)


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
