"""The pretrained digits run that ships with the package (farmer_jax/pretrained.py).

It is README command 1's run. These tests check that it restores through the
same params-only path as a workdir, that its exact test bits/dim is the
figure README.md quotes (within the standard error README quotes with it),
that its shipped classifier is used as is, that its distilled student ships
beside it, and that `sample`, `evaluate` and `score` take
`--pretrained=digits`.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import helpers
from farmer_jax import classifier
from farmer_jax import config_lib
from farmer_jax import decoders
from farmer_jax import inference
from farmer_jax import nll
from farmer_jax import pretrained
from farmer_jax import score
from farmer_jax.models import Farmer


def _readme_bpd():
  """(bits/dim, standard error) from README's table of the default run."""
  with open(os.path.join(helpers.REPO, "README.md")) as f:
    text = f.read()
  match = re.search(r"exact test bits/dim[^|\n]*\| ([\d.]+) \+/- ([\d.]+)",
                    text)
  assert match, "README.md has no 'exact test bits/dim | X +/- S' row"
  return float(match.group(1)), float(match.group(2))


def _cli(module, *args, timeout=300):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args],
                        cwd=helpers.REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return pretrained.workdir("digits", str(tmp_path_factory.mktemp("pre")))


def test_the_copy_is_a_workdir_and_is_reused(workdir):
  info = json.load(open(os.path.join(workdir, pretrained.INFO_FILE)))
  assert info["step"] == 2400
  assert os.path.exists(os.path.join(workdir, "checkpoints", "2400"))
  stamp = os.path.getmtime(os.path.join(workdir, "config.json"))
  assert pretrained.workdir("digits", workdir) == workdir  # not copied again
  assert os.path.getmtime(os.path.join(workdir, "config.json")) == stamp


def test_a_folder_holding_another_run_is_refused(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(config_lib.ConfigError, match="already holds a run"):
    pretrained.workdir("digits", str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="ships"):
    pretrained.packaged_dir("mnist_huge")


def test_evaluate_cli_reproduces_the_readme_bits_per_dim(workdir):
  bpd, stderr = _readme_bpd()
  proc = _cli("farmer_jax.evaluate", "--pretrained=digits",
              f"--workdir={workdir}", "--num_samples=10", "--bayes_images=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 2400 and result["num_images"] == 500
  assert abs(result["bpd"] - bpd) < stderr, (result["bpd"], bpd, stderr)
  assert result["samples"]["classifier_test_accuracy"] > 0.95


def test_samples_are_of_the_asked_class(workdir, monkeypatch):
  """The shipped classifier judges them: nothing is retrained."""
  run = inference.restore(workdir)
  def no_training(*args, **kwargs):
    raise AssertionError("the shipped classifier cache was not used")
  monkeypatch.setattr(classifier, "_train", no_training)
  model, params, _ = classifier.load_or_train(run.config, workdir)
  labels = np.arange(20) % 10
  images = inference.generate(run, labels, seed=0)
  assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
  accuracy = float(np.mean(classifier.predict(model, params, images)
                           == labels))
  # README: 0.888 on 500 samples; 0.6 on 20 fails with probability < 1e-3.
  assert accuracy >= 0.6, accuracy
  # Noise is far less likely than a sample under the model.
  noise = np.random.RandomState(0).randint(0, 256, (1, 28, 28, 1), np.uint8)
  bits = score.score_images(run, np.concatenate([images[:2], noise]),
                            label="null")
  assert bits[-1] > bits[:2].max() + 1, bits


def test_the_shipped_student_reconstructs_like_its_distillation(workdir):
  """`--decoder=student` finds the student in `<workdir>/distill`: it
  inverts the flow's latents of 32 test digits within its distillation's
  error (test reconstruction RMS 0.0086 over 500 digits, 0.0076 on these
  32; bound 0.015), and it is the trained student: the untrained one (the
  teacher's causal flow parameters run bidirectionally, where distillation
  starts) misses by 0.030, more than twice the trained one's error."""
  info = json.load(open(os.path.join(workdir, pretrained.INFO_FILE)))
  assert info["student"]["step"] == 1000
  run = inference.restore(workdir)
  decode_fn, params = decoders.make_decoder(run, "student")
  images, labels = classifier.real_images(run.config, "test", limit=32)
  x = nll.to_model_range(jnp.asarray(images))
  z, _ = run.model.apply(run.variables, x, labels, method=Farmer.encode)
  rms = lambda p: float(jnp.sqrt(jnp.mean(
      (jax.jit(decode_fn)(p, z, labels) - x) ** 2)))
  trained, untrained = rms(params), rms(run.variables["params"]["flow"])
  assert trained < 0.015, trained
  assert untrained > 2 * trained, (trained, untrained)


def test_sample_and_score_clis_take_pretrained(workdir, tmp_path):
  """`sample` with the shipped student (`--decoder=student`, found in the
  copy's `distill/`), then `score` on one of its digits."""
  out = str(tmp_path / "grid.png")
  proc = _cli("farmer_jax.sample", "--pretrained=digits",
              f"--workdir={workdir}", "--num_samples=4", "--labels=3,8",
              "--decoder=student", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = np.load(str(tmp_path / "grid.npz"))
  assert data["images"].shape == (4, 28, 28, 1)
  digit = str(tmp_path / "digit.png")
  Image.fromarray(data["images"][0, ..., 0]).save(digit)
  proc = _cli("farmer_jax.score", "--pretrained=digits",
              f"--workdir={workdir}", "--format=json", digit)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)[0]["error"] == ""


def test_the_notebook_opens_the_pretrained_run_by_default():
  with open(os.path.join(helpers.REPO, "notebooks", "evaluate.ipynb")) as f:
    cells = ["".join(c["source"]) for c in json.load(f)["cells"]]
  setup = next(c for c in cells if "WORKDIR =" in c)
  assert 'pretrained.workdir("digits")' in setup
