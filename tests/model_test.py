"""The mathematics of the model core (spec sections 1-5).

Every test uses random non-zero weights (the zero-initialised flow heads
would make F the identity and hide mistakes).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

import helpers
from farmer_jax import nll
from farmer_jax.models import Farmer, ar, flow, gmm, patchify, unpatchify

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_model_config(**overrides):
  cfg = helpers.load_config().model
  cfg.update(image_size=4, channels=1, patch_size=2, af_width=16, af_heads=2,
             ar_width=16, ar_heads=2, ar_layers=2, d_I=2, K_I=3, K_R=3,
             num_cond_tokens=2)
  cfg.update(overrides)
  return cfg


def init_random(model, x, labels, seed=0, scale=0.1):
  return helpers.init_random(model, x, labels, seed, scale)


def images(b=3, size=4, channels=1, seed=7):
  return jax.random.uniform(jax.random.PRNGKey(seed), (b, size, size, channels),
                            minval=-1, maxval=1)


def test_patchify_roundtrip_and_order():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  x = x[:, :, :4]  # square
  t = patchify(x, 2)
  assert t.shape == (2, 4, 12)
  np.testing.assert_array_equal(t[0, 1], x[0, 0:2, 2:4].reshape(-1))
  np.testing.assert_array_equal(unpatchify(t, 2, 4, 4), x)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_logdet_matches_jacobian(blocks):
  cfg = tiny_model_config(af_blocks=blocks, af_layers_per_block=2)
  model = Farmer(cfg)
  x, labels = images(1), jnp.array([3])
  params = init_random(model, x, labels, seed=blocks, scale=0.2)

  def f(x_flat):
    z, _ = model.apply(params, x_flat.reshape(x.shape), labels,
                       method=Farmer.encode)
    return z.reshape(-1)

  jac = jax.jacfwd(f)(x.reshape(-1))
  _, expected = np.linalg.slogdet(np.asarray(jac, np.float64))
  _, logdet = model.apply(params, x, labels, method=Farmer.encode)
  assert abs(float(expected)) > 0.1  # non-trivial map
  assert abs(float(logdet[0]) - expected) <= 1e-4 * abs(expected)


@pytest.mark.parametrize("blocks,terminal", [(1, True), (2, False), (3, True),
                                             (4, True)])
def test_decode_inverts_encode(blocks, terminal):
  cfg = tiny_model_config(af_blocks=blocks, terminal_permutation=terminal,
                          image_size=8, channels=2)
  model = Farmer(cfg)
  x, labels = images(3, 8, 2), jnp.array([0, 1, 2])
  params = init_random(model, x, labels, seed=blocks)
  z, _ = model.apply(params, x, labels, method=Farmer.encode)
  assert float(jnp.abs(z - patchify(x, 2)).max()) > 0.1  # really transformed
  x_rec = jax.jit(lambda p, z: model.apply(p, z, labels, method=Farmer.decode)
                  )(params, z)
  assert float(jnp.abs(x_rec - x).max()) <= 1e-4


@pytest.mark.parametrize("reversed_order", [False, True])
def test_flow_block_is_causal(reversed_order):
  """Token j of a block's input moves no output before j in its order."""
  cfg = tiny_model_config(af_blocks=2, image_size=8)
  model = Farmer(cfg)
  x, labels = images(2, 8), jnp.array([0, 1])
  params = init_random(model, x, labels)
  t = 1 if reversed_order else 0

  @jax.jit
  def block_out(tokens):  # raster tokens in, raster tokens out
    def fn(m, tok):
      tok = tok[:, ::-1] if t else tok
      y, _ = m.flow.block_apply(t, '__call__', tok, labels)
      return y[:, ::-1] if t else y
    return model.apply(params, tokens, method=fn)

  tokens = patchify(x, 2)
  n = tokens.shape[1]
  for j in [0, 5, n - 1]:
    changed = block_out(tokens.at[:, j].add(1.0)) - block_out(tokens)
    diff = jnp.abs(changed).max(axis=(0, 2))  # per raster token
    before = np.arange(n) > j if reversed_order else np.arange(n) < j
    after = np.arange(n) < j if reversed_order else np.arange(n) > j
    assert float(diff[before].max(initial=0)) == 0.0
    assert float(diff[j]) > 0  # y_j = x_j shifted and scaled
    if after.any():
      assert float(diff[after].max()) > 1e-4


@pytest.mark.parametrize("redundant_prior", ["shared", "token"])
def test_ar_prior_is_causal(redundant_prior):
  cfg = tiny_model_config(image_size=8, redundant_prior=redundant_prior)
  model = Farmer(cfg)
  x, labels = images(2, 8), jnp.array([0, 1])
  params = init_random(model, x, labels)
  z, _ = model.apply(params, x, labels, method=Farmer.encode)
  n = z.shape[1]

  @jax.jit
  def mixtures(z):
    return model.apply(params, z, labels, method=lambda m, z, l: m.prior(z, l))

  base_i, base_r = mixtures(z)
  for j in [0, 7, n - 1]:
    mix_i, mix_r = mixtures(z.at[:, j, 0].add(1.0))
    diff = jnp.abs(mix_i.means - base_i.means).max(axis=(0, 2, 3))
    assert float(diff[:j + 1].max()) == 0.0  # token i sees only z_<i
    if j + 1 < n:
      assert float(diff[j + 1:].max()) > 1e-5
    assert float(jnp.abs(mix_r.means - base_r.means).max()) > 1e-5
  # Redundant channels never feed the prior's transformer.
  mix_i, mix_r = mixtures(z.at[:, :, cfg.d_I:].add(1.0))
  assert float(jnp.abs(mix_i.logits - base_i.logits).max()) == 0.0
  assert float(jnp.abs(mix_r.logits - base_r.logits).max()) == 0.0


class _TwoTokenModel(nn.Module):
  """Flow + AR prior on 2 tokens of 2 channels, as Farmer composes them."""
  cfg: dict

  @nn.compact
  def __call__(self, tokens, labels):
    z, logdet = flow.AutoregressiveFlow(self.cfg, 2, 2, name="flow")(tokens,
                                                                     labels)
    logp_i, logp_r = ar.ARPrior(self.cfg, 2, 2, name="prior").log_prob(
        z, labels)
    return logp_i + logp_r + logdet


@pytest.mark.parametrize("redundant_prior", ["shared", "token"])
def test_density_integrates_to_one(redundant_prior):
  # Normalisation does not depend on how deep the networks computing the
  # shifts, scales and mixtures are: one prior layer and one class token
  # (the flow blocks have one layer each) make each evaluation ~30%
  # cheaper; both flow orders (2 blocks) are kept.
  cfg = tiny_model_config(af_blocks=2, d_I=1, K_I=3, K_R=2, ar_layers=1,
                          num_cond_tokens=1, redundant_prior=redundant_prior)
  model = _TwoTokenModel(cfg)
  labels = jnp.array([4])
  params = init_random(model, jnp.zeros((1, 2, 2)), labels, seed=3, scale=0.1)
  # Riemann sum on a box wide enough for the flow's tails (the random flow
  # moves mass past +-7) and fine enough for the mixtures' peaks: 30 points
  # a side on +-9 (810K evaluations). The sum is converged there: on 26, 28,
  # 32 points (+-9) and 40 (+-10, 2.56M evaluations, 2.4x the time) both
  # priors gave 0.989-1.011; without the flow's log-det it is 0.36.
  g = np.linspace(-9, 9, 30, dtype=np.float32)
  pts = np.stack(np.meshgrid(g, g, g, g, indexing="ij"), -1).reshape(-1, 2, 2)
  # In chunks of 10K points: one pass over all of them peaks at gigabytes,
  # and chunks that stay in cache run faster.
  chunks = pts.reshape(81, -1, 2, 2)
  mass = jax.jit(lambda p, c: jnp.sum(jnp.exp(model.apply(
      p, c, jnp.broadcast_to(labels, (c.shape[0],))))))
  with helpers.optimized():  # 810K evaluations: running, not compiling
    total = sum(float(mass(params, c)) for c in chunks) * float(g[1] - g[0]) ** 4
  assert abs(total - 1.0) <= 0.02, total


def test_mixture_log_prob_matches_scipy():
  rng = np.random.default_rng(0)
  k, d = 5, 3
  logits = rng.normal(size=(4, k)).astype(np.float32)
  means = rng.normal(size=(4, k, d)).astype(np.float32)
  scales = rng.uniform(0.3, 2.0, size=(4, k, d)).astype(np.float32)
  z = rng.normal(size=(4, d)).astype(np.float32)
  ours = gmm.log_prob(z, gmm.Mixture(logits, means, scales))
  for b in range(4):
    comp = [stats.multivariate_normal(means[b, c], np.diag(scales[b, c] ** 2)
                                      ).logpdf(z[b]) for c in range(k)]
    expected = special.logsumexp(np.array(comp) + logits[b]
                                 - special.logsumexp(logits[b]))
    assert abs(float(ours[b]) - expected) <= 1e-5 * max(1, abs(expected))


def test_mixture_sampling_moments():
  mix = gmm.Mixture(jnp.log(jnp.array([0.25, 0.75])),
                    jnp.array([[-2.0], [1.0]]), jnp.array([[0.5], [0.2]]))
  mix = jax.tree.map(lambda a: jnp.broadcast_to(a, (20000,) + a.shape), mix)
  s = gmm.sample(jax.random.PRNGKey(0), mix)[:, 0]
  assert abs(float(s.mean()) - 0.25) < 0.03  # 0.25*-2 + 0.75*1
  var = 0.25 * (0.25 + 4) + 0.75 * (0.04 + 1) - 0.25 ** 2
  assert abs(float(s.var()) - var) < 0.05


def test_uniform_density_over_the_256_levels_is_8_bits():
  # Density 127.5 / 256 per dimension on [-1, 1] +- half a bin.
  d = 12
  flat = d * math.log(256 / 127.5)
  assert abs(float(nll.bits_per_dim(jnp.float32(flat), d)) - 8.0) < 1e-5


@pytest.mark.parametrize("redundant_prior", ["shared", "token"])
def test_gradients_reach_every_parameter(redundant_prior):
  cfg = tiny_model_config(redundant_prior=redundant_prior)
  model = Farmer(cfg)
  x, labels = images(4), jnp.array([0, 1, 2, 10])
  params = init_random(model, x, labels)

  def loss(p):
    out = model.apply(p, x, labels, train=True,
                      rngs={"dropout": jax.random.PRNGKey(0)})
    return -out["log_prob"].mean()

  grads = jax.jit(jax.grad(loss))(params)["params"]
  for group in ["flow", "prior"]:
    assert group in grads
  assert "head_I" in grads["prior"] and "head_R" in grads["prior"]
  flat = jax.tree_util.tree_leaves_with_path(jax.device_get(grads))
  for path, g in flat:  # NumPy: no eager op compiled per leaf shape.
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_gaussian_prior_is_tarflow_objective():
  cfg = tiny_model_config(prior="gaussian", af_blocks=2)
  model = Farmer(cfg)
  x, labels = images(3), jnp.array([0, 1, 2])
  params = init_random(model, x, labels)
  assert set(params["params"]) == {"flow"}
  z, logdet = model.apply(params, x, labels, method=Farmer.encode)
  d = z.shape[1] * z.shape[2]
  tarflow = 0.5 * jnp.sum(z ** 2, axis=(1, 2)) + 0.5 * d * math.log(
      2 * math.pi) - logdet
  np.testing.assert_allclose(-model.apply(params, x, labels,
                                          method=Farmer.log_prob),
                             tarflow, rtol=1e-5)


def test_no_split_ablation():
  cfg = tiny_model_config(d_I=4)  # d = 2*2*1 = 4: every channel informative
  model = Farmer(cfg)
  x, labels = images(2), jnp.array([0, 1])
  params = init_random(model, x, labels)
  assert "head_R" not in params["params"]["prior"]
  out = model.apply(params, x, labels)
  assert float(jnp.abs(out["logp_R"]).max()) == 0.0
  assert bool(jnp.all(jnp.isfinite(out["log_prob"])))


def test_bf16_activations_keep_f32_params_and_logprobs():
  cfg = tiny_model_config(dtype="bfloat16")
  model = Farmer(cfg)
  x, labels = images(2), jnp.array([0, 1])
  params = init_random(model, x, labels)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  out = model.apply(params, x, labels)
  for k, v in out.items():
    assert v.dtype == jnp.float32, k
  f32 = Farmer(tiny_model_config()).apply(params, x, labels)
  np.testing.assert_allclose(out["log_prob"], f32["log_prob"], rtol=0.05)


def test_layers_are_scanned_and_logically_named():
  cfg = tiny_model_config(af_layers_per_block=3, ar_layers=5)
  model = Farmer(cfg)
  variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)},
                                  images(1), jnp.array([0]))
  qkv = variables["params"]["prior"]["transformer"]["layers"]["attn"]["qkv"]
  assert qkv.names == ("layers", "embed", None, "heads", "kv")
  assert qkv.value.shape[0] == 5
  flow_qkv = variables["params"]["flow"]["blocks"]["transformer"]["layers"][
      "attn"]["qkv"]
  assert flow_qkv.names == ("blocks", "layers", "embed", None, "heads", "kv")
  assert flow_qkv.value.shape[:2] == (cfg.af_blocks, 3)


def test_zero_init_flow_is_identity():
  cfg = tiny_model_config(af_blocks=3, terminal_permutation=False)
  model = Farmer(cfg)
  x, labels = images(2), jnp.array([0, 1])
  variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, x, labels)
  z, logdet = model.apply(variables, x, labels, method=Farmer.encode)
  np.testing.assert_allclose(z, patchify(x, 2), atol=1e-6)
  assert float(jnp.abs(logdet).max()) == 0.0


@pytest.fixture(scope="module")
def scanned_reference():
  """The default (scanned, no remat) model: parameters, log-density and its
  gradients, latents; shared by the variants it is compared with."""
  cfg = tiny_model_config(af_blocks=3, af_layers_per_block=2, image_size=8)
  x, labels = images(2, 8), jnp.array([0, 1])
  ref = Farmer(cfg)
  params = init_random(ref, x, labels)
  value, grads = _value_and_grad(ref, params, x, labels)
  z, _ = jax.jit(lambda p: ref.apply(p, x, labels, method=Farmer.encode))(
      params)
  return x, labels, params, value, grads, z


def _value_and_grad(model, params, x, labels):
  fn = lambda p: model.apply(p, x, labels)["log_prob"].sum()
  return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("overrides", [
    dict(scan_layers=False),
    dict(remat="nothing_saveable"),
    dict(remat="dots_saveable", scan_layers=False),
])
def test_unrolled_and_rematerialised_models_compute_the_same(
    overrides, scanned_reference):
  """`scan_layers=False` / remat policies: same parameters, same log-density
  and gradients, and the same exact inverse."""
  x, labels, params, v0, g0, z = scanned_reference
  other = Farmer(tiny_model_config(af_blocks=3, af_layers_per_block=2,
                                   image_size=8, **overrides))
  v1, g1 = _value_and_grad(other, params, x, labels)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    # float32 sums in another order: errors scale with the leaf's largest
    # entry (the loss sums a batch; gradients reach ~25).
    np.testing.assert_allclose(b, a, rtol=1e-4,
                               atol=1e-5 * max(1.0, float(np.abs(a).max())))
  back = jax.jit(lambda z: other.apply(params, z, labels,
                                       method=Farmer.decode))(z)
  assert float(jnp.abs(back - x).max()) < 1e-4


@pytest.mark.parametrize("name, expect, remat", [
    ("highest", "HIGHEST", "none"), ("highest", "HIGHEST", "full"),
    ("default", "DEFAULT", "none")])
def test_matmul_precision_reaches_every_matmul(name, expect, remat):
  # On a GPU 'default' is TF32 and the exact inverse misses by ~0.07 (README
  # "On a GPU"); the CPU cannot show that, but the lowered programs show
  # whether every dot asks for the configured precision: the training
  # gradient, the exact inverse and KV-cached AR sampling. The process
  # default ('highest' in this file) is set to 'default' around the traces,
  # so a dot that forgets the config's precision shows as DEFAULT.
  from farmer_jax import sampling  # pylint: disable=g-import-not-at-top
  model = Farmer(tiny_model_config(matmul_precision=name, remat=remat,
                                   redundant_prior="token"))
  x, labels = images(), jnp.arange(3, dtype=jnp.int32)
  params = init_random(model, x, labels)
  z = jnp.zeros((3, model.num_tokens, model.token_dim))
  programs = {
      "gradient": lambda p: jax.grad(
          lambda p: model.apply(p, x, labels)["log_prob"].sum())(p),
      "inverse": lambda p: model.apply(p, z, labels, method=Farmer.decode),
      "sampling": lambda p: sampling.sample_latents(
          model, p, jax.random.PRNGKey(0), labels),
  }
  if name == "default":  # that it is not forced up: one program is enough.
    programs = {"inverse": programs["inverse"]}
  if remat != "none":  # the recomputed forward inside the backward pass.
    programs = {"gradient": programs["gradient"]}
  with jax.default_matmul_precision("default"):
    for what, fn in programs.items():
      dots = [l for l in jax.jit(fn).lower(params).as_text().splitlines()
              if "dot_general" in l]
      assert dots, what
      wrong = [l for l in dots if f"precision = [{expect}, {expect}]" not in l]
      assert not wrong, (what, len(wrong), len(dots), wrong[0])


def test_per_block_checkpoints_convert_to_stacked_blocks():
  """`flow.stack_blocks`: `block0..block{n-1}` -> `blocks` with a leading
  block axis, in block order; stacked trees pass through."""
  n = 11  # block10 sorts before block2 as text: the order must be numeric
  cfg = tiny_model_config(af_blocks=n)
  model = Farmer(cfg)
  x, labels = images(2), jnp.array([0, 1])
  stacked = init_random(model, x, labels)["params"]["flow"]
  per_block = {f"block{t}": jax.tree.map(lambda a: a[t], stacked["blocks"])
               for t in range(n)}
  back = flow.stack_blocks(per_block)
  assert jax.tree.structure(back) == jax.tree.structure(stacked)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(a, b)
  assert flow.stack_blocks(stacked) is stacked
