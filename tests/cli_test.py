"""Sampling, evaluation and scoring of a trained tiny run (spec 6-7).

All tests share one tiny digits model trained for `helpers.TRAINED_STEPS`
steps (the `trained_workdir` fixture). The quality assertions are real:
fixed seeds, thresholds well inside what the trained model reaches
(measured with the sample classifier, farmer_jax/classifier.py: accuracy 0.18 at w=0 and 0.33
at w=3 with 200 samples; chance is 0.10) and outside what an untrained or unguided sampler gives.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import helpers
from farmer_jax import checkpointing
from farmer_jax import classifier
from farmer_jax import evaluate
from farmer_jax import inference
from farmer_jax import metrics
from farmer_jax import models
from farmer_jax import nll
from farmer_jax import sampling
from farmer_jax import score
from farmer_jax import sharding
from farmer_jax import train

NUM_SAMPLES = 200

@pytest.fixture(scope="module")
def run(trained_workdir):
  return inference.restore(trained_workdir)


@pytest.fixture(scope="module")
def clf(run, trained_workdir):
  model, params, info = classifier.load_or_train(run.config, trained_workdir)
  return (model, params), info


def _cli(module, *args, timeout=300):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=helpers.REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_classifier_is_a_usable_judge(clf):
  _, info = clf
  assert info["test_accuracy"] > 0.9  # real digits: the judge must know them


def test_guidance_raises_sample_class_accuracy(run, clf, trained_workdir):
  """Samples show their class above chance; CFG (w=3) shows it more."""
  real, _ = classifier.real_images(run.config, "test")
  real_feats = classifier.features(*clf[0], real)
  rows = evaluate.sample_quality_at(run, clf[0], real_feats, [0.0, 3.0],
                                    NUM_SAMPLES, seed=0,
                                    batch_size=NUM_SAMPLES)
  acc0, acc3 = rows[0]["accuracy"], rows[1]["accuracy"]
  assert acc0 > 0.15, rows  # chance is 0.10
  assert acc3 > acc0 + 0.05, rows
  assert all(np.isfinite(r["frechet"]) and r["frechet"] > 0 for r in rows)


def test_generate_is_deterministic_and_in_range(run):
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
  a = inference.generate(run, labels, seed=3, cfg_scale=1.0)
  b = inference.generate(run, labels, seed=3, cfg_scale=1.0)
  c = inference.generate(run, labels, seed=4, cfg_scale=1.0)
  assert a.dtype == np.uint8 and a.shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert a.std() > 10  # not a constant image


def test_a_sweep_of_weights_and_temperatures_compiles_one_sampler(run):
  """Guidance weights and temperatures are jit arguments, not constants:
  `evaluate`'s sweeps compile once, and the draws are those of the options
  bound statically."""
  labels = np.arange(run.batch_shards)  # one batch, no padding
  kws = [dict(cfg_scale=1.0), dict(cfg_scale=3.0, logit_temp=0.7,
                                   resample_temp=2.0, r_var_scale=0.5)]
  fns = [inference.sampler(run.model, run.batch_sharding,
                           inference.sampling_kwargs(run.config.sample,
                                                     **kw))[0] for kw in kws]
  assert fns[0] is fns[1]
  # Other tests may have compiled it already (for this batch shape or not).
  compiled = fns[0]._cache_size()  # pylint: disable=protected-access
  for kw in kws:
    traced = inference.generate(run, labels, seed=5, **kw)
    options = inference.sampling_kwargs(run.config.sample, **kw)
    with sharding.context(run.mesh, run.config):
      static = jax.jit(functools.partial(sampling.sample_images, run.model,
                                         **options))(
          run.variables, jax.random.fold_in(jax.random.PRNGKey(5), 0),
          jnp.asarray(labels, jnp.int32))
    np.testing.assert_array_equal(traced, nll.to_uint8(static))
  added = fns[0]._cache_size() - compiled  # pylint: disable=protected-access
  assert added <= 1, added
  # A zero weight is another program (one stream), not a traced zero.
  unguided = inference.sampling_kwargs(run.config.sample, cfg_scale=0.0)
  assert inference.sampler(run.model, run.batch_sharding,
                           unguided)[0] is not fns[0]


def test_evaluate_writes_exact_bpd_and_sweep(run, trained_workdir):
  result = evaluate.evaluate(trained_workdir, num_samples=20, sweep=True,
                             batch_size=20)
  saved = json.load(open(os.path.join(trained_workdir, "eval",
                                      f"{run.step}.json")))
  assert saved["bpd"] == result["bpd"]
  assert result["num_images"] == 297  # the whole sklearn digits test split
  # The uniform density over the 256 levels is exactly 8 bits/dim; the
  # trained model must beat it (12 steps of training give ~8.6).
  assert result["bpd"] < 8.0
  assert 0 < result["bpd_stderr"] < 0.2
  assert [r["cfg_scale"] for r in result["cfg_sweep"]] == [0.0, 1.0, 3.0]
  # Every sampling option used is recorded; the Bayes-rule accuracy is there.
  assert saved["sampling"] == inference.sampling_kwargs(run.config.sample)
  assert saved["bayes_num_images"] == run.config.eval_bayes_images == 64
  assert 0.0 <= saved["bayes_accuracy"] <= 1.0
  # Resampling CFG never falls back to p_c; the count is reported.
  assert saved["samples"]["guidance_fallbacks"] == 0
  prefix = os.path.join(trained_workdir, "eval", f"cfg_sweep_{run.step}")
  lines = open(prefix + ".csv").read().splitlines()
  assert lines[0] == "cfg_scale,accuracy,frechet,num_samples"
  assert len(lines) == 4
  assert Image.open(prefix + ".png").size[0] > 100


def test_bayes_accuracy_equals_a_loop_over_classes(run):
  """`metrics.bayes_accuracy` (one jitted call for all classes) == the
  argmax over classes of `Farmer.log_prob` called once per class, on the
  same dequantised images; padding and images past `num_images` ignored."""
  images, labels = classifier.real_images(run.config, "test", limit=40)
  pad = lambda a: np.concatenate([a, np.zeros((8,) + a.shape[1:], a.dtype)])
  images, labels = pad(images), pad(labels)
  mask = (np.arange(48) < 40).astype(np.float32)
  batches = [dict(image=images[i:i + 16], label=labels[i:i + 16],
                  mask=mask[i:i + 16]) for i in range(0, 48, 16)]
  rng, num_images = jax.random.PRNGKey(3), 36
  log_probs_fn = jax.jit(functools.partial(
      metrics.class_log_probs, run.model, num_classes=10))
  log_prob = jax.jit(functools.partial(run.model.apply,
                                       method=models.Farmer.log_prob))
  hits = []
  with sharding.context(run.mesh, run.config):
    got = metrics.bayes_accuracy(log_probs_fn, run.variables["params"],
                                    batches, rng, num_images)
    for i, batch in enumerate(batches):
      key = jax.random.fold_in(rng, i)
      x = nll.uniform_dequantize(key, batch["image"])
      expected = np.stack([log_prob(run.variables, x, np.full(16, c))
                           for c in range(10)], axis=-1)
      np.testing.assert_allclose(
          log_probs_fn(run.variables["params"], batch, key), expected,
          rtol=1e-5, atol=1e-3)
      hits.append(expected.argmax(-1) == batch["label"])
  hits = np.concatenate(hits)[:num_images]
  assert got == dict(bayes_accuracy=float(hits.mean()),
                     bayes_num_images=num_images)
  assert got["bayes_accuracy"] > 0.3  # chance is 0.1


def _digit_and_noise(run, tmp_path):
  real, _ = classifier.real_images(run.config, "test", limit=3)
  paths = []
  for i, image in enumerate(real):
    paths.append(str(tmp_path / f"digit{i}.png"))
    Image.fromarray(image[..., 0]).save(paths[-1])
  noise = np.random.RandomState(0).randint(0, 256, (8, 8), np.uint8)
  paths.append(str(tmp_path / "noise.png"))
  Image.fromarray(noise).save(paths[-1])
  return paths


def test_score_ranks_noise_above_digits_and_reports_bad_files(run, tmp_path):
  paths = _digit_and_noise(run, tmp_path)
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
  Image.new("L", (9, 9)).save(tmp_path / "big.png")
  Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
  bad = [str(tmp_path / n) for n in ("corrupt.png", "big.png", "rgb.png")]
  for label in ("null", "marginal", "3"):
    rows = score.score_files(run, paths + bad, label=label)
    by_name = {os.path.basename(r["file"]): r for r in rows}
    noise = by_name["noise.png"]["bits_per_dim"]
    digits = [by_name[f"digit{i}.png"]["bits_per_dim"] for i in range(3)]
    assert max(digits) < noise - 1.0, (label, rows)
    assert rows[0]["file"].endswith("noise.png")  # highest bits/dim first
  assert "unreadable" in by_name["corrupt.png"]["error"]
  assert "9x9" in by_name["big.png"]["error"]
  assert "3 channel" in by_name["rgb.png"]["error"]
  assert all(r["bits_per_dim"] is None for r in rows[-3:])


def test_marginal_likelihood_is_the_class_average(run):
  real, labels = classifier.real_images(run.config, "test", limit=4)
  per_class = np.stack([score.score_images(run, real, label=str(c))
                        for c in range(10)])  # bits/dim
  marginal = score.score_images(run, real, label="marginal")
  dims = 64
  # bpd -> log p: -(bpd * ln2 - log 127.5) * D; marginal = logmeanexp.
  logp = -(per_class * np.log(2) - np.log(127.5)) * dims
  expected = np.logaddexp.reduce(logp, axis=0) - np.log(10)
  got = -(marginal * np.log(2) - np.log(127.5)) * dims
  np.testing.assert_allclose(got, expected, atol=1e-2)
  del labels


def test_sample_and_score_clis(trained_workdir, tmp_path):
  out = str(tmp_path / "grid.png")
  proc = _cli("farmer_jax.sample", f"--workdir={trained_workdir}",
              "--num_samples=6", "--labels=2,7", "--cfg_scale=1",
              "--num_candidates=4", "--num_uncond_candidates=2",
              "--proposal=balance", "--weigh_logit_temp=0.5",
              "--resample_temp=1.5", "--r_var_scale=0.5", "--seed=1",
              f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = np.load(str(tmp_path / "grid.npz"))
  assert data["images"].shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(data["labels"], [2, 7, 2, 7, 2, 7])
  assert Image.open(out).size == (2 * 9 + 1, 3 * 9 + 1)  # 2 columns
  folder = tmp_path / "to_score"
  folder.mkdir()
  Image.fromarray(data["images"][0, ..., 0]).save(folder / "sample.png")
  (folder / "junk.png").write_text("junk")
  proc = _cli("farmer_jax.score", f"--workdir={trained_workdir}",
              "--format=json", str(folder))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(proc.stdout)
  assert [r["file"].endswith("junk.png") for r in rows] == [False, True]
  assert rows[0]["bits_per_dim"] > 0 and "1 of 2 file(s)" in proc.stderr


def test_a_mesh_that_does_not_fit_is_an_error_naming_the_override():
  config = helpers.load_config("digits", "tiny")
  config.mesh_shape = (2, 4, 1)
  fitted, mesh = inference.create_mesh(config)
  assert dict(mesh.shape) == dict(data=2, fsdp=4, tensor=1)
  config.mesh_shape = (16, 1, 1)  # e.g. trained on a 16-chip slice
  with pytest.raises(inference.MeshMismatchError,
                     match=r"\(16, 1, 1\).*--mesh=-1,1,1"):
    inference.create_mesh(config, "w")
  fitted, mesh = inference.create_mesh(
      config, mesh_shape=inference.parse_mesh("1,-1,1"))
  assert dict(mesh.shape) == dict(data=1, fsdp=8, tensor=1)
  assert tuple(fitted.mesh_shape) == (1, -1, 1)
  assert tuple(config.mesh_shape) == (16, 1, 1)  # the caller's is untouched


def test_restore_reads_the_ema_params_onto_the_override_mesh(
    trained_workdir):
  """Params only (no optimizer state), equal to the saved EMA, FSDP-sharded
  on the `--mesh` given although the run trained data-parallel."""
  run = inference.restore(trained_workdir, mesh_shape=(1, -1, 1))
  config = run.config
  model = run.model
  _, abstract, _ = train.create_sharded_state(
      config, model, train.create_optimizer(config)[0], run.mesh)
  ckpt = checkpointing.Checkpointer(trained_workdir, config, read_only=True)
  try:
    state = ckpt.restore_state(None, abstract)
  finally:
    ckpt.close()
  assert set(run.variables) == {"params"}
  for a, b in zip(jax.tree.leaves(run.variables["params"]),
                  jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  wi = run.variables["params"]["prior"]["transformer"]["layers"]["mlp"]["wi"]
  assert tuple(wi.sharding.spec) == (None, "fsdp", "tensor")


def test_runs_saved_before_the_sampling_options_still_load(tmp_path):
  """An older config.json samples as it did: balance weights on the
  sampling temperatures, one candidate count for z^I and z^R; Bayes off."""
  config = helpers.load_config("digits", "tiny")
  config.sample.logit_temp, config.sample.num_candidates = 0.7, 8
  for key in ("proposal", "weigh_logit_temp", "weigh_scale_temp",
              "resample_temp", "r_num_candidates", "r_num_uncond_candidates",
              "r_var_scale"):
    del config.sample[key]
  del config["eval_bayes_images"]
  inference.save_config(config, str(tmp_path))
  loaded = inference.load_config(str(tmp_path))
  assert inference.sampling_kwargs(loaded.sample) == dict(
      cfg_scale=1.0, num_candidates=8, num_uncond_candidates=0,
      guidance="resample", logit_temp=0.7, scale_temp=1.0,
      weigh_logit_temp=0.7, weigh_scale_temp=1.0, resample_temp=1.0,
      proposal="balance", r_num_candidates=8, r_num_uncond_candidates=0,
      r_var_scale=1.0)
  assert loaded.eval_bayes_images == 0


def test_saved_config_round_trips_exactly(tmp_path):
  """config.json gives back the run's config, tuples included."""
  config = helpers.load_config("digits", "tiny")
  config.debug_nonfinite_steps = (3, 4)
  inference.save_config(config, str(tmp_path))
  assert inference.load_config(str(tmp_path)).to_dict() == config.to_dict()
