"""The block-wise Jacobi inverse of the flow (farmer_jax/models/jacobi.py).

The model is configs/digits.py:tiny (N = 16 tokens of d = 4, 2 flow blocks)
with random non-zero weights (`helpers.init_random`), so the flow is far
from the identity; the latents are `F(x)` of real 8x8 test digits. The
reference is the exact sequential inverse `Farmer.decode`, an independent
program (one token per step): `C` Jacobi iterations per chunk of `C` must
reproduce it, fewer at the default tolerance must stay close, and an
image's result must not depend on the batch it is decoded in.
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

import helpers
from farmer_jax import checkpointing
from farmer_jax import classifier
from farmer_jax import config_lib
from farmer_jax import decoders
from farmer_jax import evaluate
from farmer_jax import inference
from farmer_jax import nll
from farmer_jax import sharding
from farmer_jax.models import Farmer
from farmer_jax.models import jacobi

BATCH = 8  # one image per fake CPU device (conftest).
N = 16  # tokens of the tiny model: (8 // 2)**2.


def _config():
  return helpers.load_config("digits", "tiny")


@functools.cache
def tiny():
  """`(model, params, z, labels, exact)`: latents of 8 real test digits and
  their exact inverse."""
  config = _config()
  model = Farmer(config.model)
  images, labels = classifier.real_images(config, "test", limit=BATCH)
  x = nll.to_model_range(jnp.asarray(images))
  labels = jnp.asarray(labels)
  params = helpers.init_random(model, x[:1], labels[:1], seed=3, scale=0.05)
  z, _ = jax.jit(functools.partial(model.apply, method=Farmer.encode))(
      params, x, labels)
  exact = jax.jit(functools.partial(model.apply, method=Farmer.decode))(
      params, z, labels)
  return model, params, z, labels, np.asarray(exact)


@functools.cache
def _decode_fn(model):
  return jax.jit(functools.partial(model.apply, method=Farmer.decode_jacobi),
                 static_argnums=3)


def decode(options, z=None, labels=None):
  """`(x, iterations)` of the Jacobi decoder on the tiny model, numpy."""
  model, params, z_all, labels_all, _ = tiny()
  z = z_all if z is None else z
  labels = labels_all if labels is None else labels
  x, iterations = _decode_fn(model)(params, z, labels, options)
  return np.asarray(x), np.asarray(iterations)


def _options(chunks, max_iters, tol):
  return jacobi.JacobiOptions(tuple(chunks), tuple(max_iters), tol)


# ------------------------------------------------------------ the solver ---


@pytest.mark.parametrize("chunk", [1, 4, N])
def test_chunk_many_iterations_reproduce_the_sequential_inverse(chunk):
  """Triangular system: `C` iterations make a chunk of `C` exact (1: the
  sequential inverse, N: pure Jacobi); float32 rounding of two different
  programs, so 1e-5 (measured: 0 for C = 1, the same arithmetic; 7e-7 and
  1.1e-6 for 4 and 16). One iteration fewer leaves the chunks' last tokens wrong
  (measured 0.10 for C = 4), so the comparison can fail."""
  _, _, _, _, exact = tiny()
  assert np.abs(exact).max() > 0.5  # not a degenerate all-zero decode
  x, iterations = decode(_options([chunk] * 2, [chunk] * 2, 0.0))
  np.testing.assert_allclose(x, exact, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(iterations, chunk)  # tol 0: every one runs
  if chunk == 4:
    short, _ = decode(_options([chunk] * 2, [chunk - 1] * 2, 0.0))
    assert np.abs(short - exact).max() > 1e-2


# Pure Jacobi (one chunk of N = 16, the configs' default) at the configs'
# default jacobi_tol 1e-3, measured on this model and these 8 images: max
# |error| 7.6e-4 after a mean 8.5 / 7.25 iterations (blocks 0 / 1; at most
# 10 / 9) of 16. The bound leaves a factor 4 and is half a uint8 level
# (1/255). With one patch row per chunk (4 tokens) this random model needs
# all 4 iterations; the trained digits model (workdirs/digits, 2,400 steps)
# needs ~4 of 49 in one chunk and ~3 of 7 per row.
DEFAULT_TOL_BOUND = 1 / 255


def _pure_jacobi_config():
  config = _config()
  assert config.sample.jacobi_chunk == 0  # the default: all N tokens
  return config


def test_default_tolerance_is_close_and_saves_iterations():
  """Pure Jacobi at the default tolerance: within `DEFAULT_TOL_BOUND` of
  the exact inverse in fewer than N iterations per block; tol 0 would run
  all N (tested above)."""
  config = _pure_jacobi_config()
  assert config.sample.jacobi_tol == helpers.load_config(
      "digits", "").sample.jacobi_tol == 1e-3
  options = decoders.jacobi_options(config)
  assert options.chunks == (N, N) and options.max_iters == (N, N)
  _, _, _, _, exact = tiny()
  x, iterations = decode(options)
  err = np.abs(x - exact).max()
  assert 1e-5 < err < DEFAULT_TOL_BOUND, err  # inexact, but close
  assert iterations.shape == (BATCH, 2)
  assert np.all(iterations.max(0) < 12), iterations
  assert np.all(iterations >= 1)


def test_an_image_decodes_alike_alone_and_in_a_batch():
  """Per-image stopping: an image whose chunk has converged is frozen, so
  its result and counts are those it gets alone (measured: equal counts,
  |difference| <= 8e-7, the rounding of batch 1 vs 8). A coarse tolerance
  (1e-2, pure Jacobi) makes the images stop after 5 to 8 iterations
  (checked), so one that kept iterating with the batch would move by
  ~1e-3 to 1e-2, far above 1e-5."""
  _, _, z, labels, _ = tiny()
  options = _options([N, N], [N, N], 1e-2)
  x, iterations = decode(options)
  assert len(np.unique(iterations)) > 1, iterations
  for i in range(BATCH):
    x_i, it_i = decode(options, z[i:i + 1], labels[i:i + 1])
    np.testing.assert_allclose(x_i[0], x[i], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(it_i[0], iterations[i])


def test_per_block_overrides_take_effect():
  """`jacobi_block_chunks` / `jacobi_block_max_iters` change the blocks they
  name: chunk 2 in block 0 and pure Jacobi (16) in block 1 is still exact
  with tol 0 (two runs of the block scan), and 3 iterations of 16 in block
  1 are counted as 3 and are not."""
  config = _config()
  config.sample.update(jacobi_chunk=N, jacobi_tol=0.0, jacobi_max_iters=0,
                       jacobi_block_chunks=((0, 2),))
  options = decoders.jacobi_options(config)
  assert (options.chunks, options.max_iters) == ((2, N), (2, N))
  _, _, _, _, exact = tiny()
  x, iterations = decode(options)
  np.testing.assert_allclose(x, exact, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(iterations, [[2, N]] * BATCH)
  limited = decoders.jacobi_options(
      config, jacobi_block_max_iters=((1, 3),))
  assert limited.max_iters == (2, 3)
  x3, iterations3 = decode(limited)
  np.testing.assert_array_equal(iterations3, [[2, 3]] * BATCH)
  assert np.abs(x3 - exact).max() > 1e-2


def test_jacobi_decode_under_the_mesh_stays_batch_sharded():
  """On the 8-device mesh: the decode of batch-sharded latents comes back
  batch-sharded with no all-gather in the program (the flow's parameters
  are replicated, images never meet), and `inference.generate` with the
  Jacobi decoder (guided: two AR streams) gives the exact decoder's
  samples to within one uint8 level, with its iteration counts."""
  config = _pure_jacobi_config()  # images stop after different counts
  model, params, z, labels, exact = tiny()
  mesh = sharding.create_mesh(config)
  assert mesh.size == 8
  run = inference.Run(config, model,
                      jax.device_put(params, sharding.replicated(mesh)), 0,
                      mesh, "")
  decoder = decoders.jacobi_decoder(run)
  z_sharded = jax.device_put(z, run.batch_sharding)
  labels_sharded = jax.device_put(labels, run.batch_sharding)
  with sharding.context(mesh, config):
    compiled = jax.jit(decoder[0]).lower(decoder[1], z_sharded,
                                         labels_sharded).compile()
    x, stats = compiled(decoder[1], z_sharded, labels_sharded)
  assert "all-gather" not in compiled.as_text()
  for a in (x, stats["jacobi_iterations"]):
    assert a.sharding.is_equivalent_to(run.batch_sharding, a.ndim), a.sharding
  assert np.abs(np.asarray(x) - exact).max() < DEFAULT_TOL_BOUND
  sample_labels = np.arange(BATCH) % 10
  stats = {}
  assert config.sample.cfg_scale > 0  # guided: the cond + uncond streams
  jac = inference.generate(run, sample_labels, seed=0, decoder=decoder,
                           stats=stats)
  ref = inference.generate(run, sample_labels, seed=0)
  assert np.abs(jac.astype(int) - ref).max() <= 1
  assert len(stats["jacobi_iterations_per_chunk"]) == 2
  assert stats["jacobi_chunks"] == [N, N]


# ------------------------------------------------------------ the config ---


@pytest.mark.parametrize("overrides, message", [
    (dict(jacobi_chunk=3), "chunk 3 does not divide the N = 16"),
    (dict(jacobi_tol=-1.0), "config.sample.jacobi_tol"),
    (dict(jacobi_max_iters=-1), "config.sample.jacobi_max_iters"),
    (dict(jacobi_block_chunks=((2, 4),)), "names block 2"),
    (dict(jacobi_block_chunks=((0, 5),)), "chunk 5 does not divide"),
    (dict(jacobi_block_max_iters=((0, 1), (0, 2))), "block 0 twice"),
    (dict(decoder="fast"), "config.sample.decoder"),
])
def test_bad_jacobi_settings_name_the_key(overrides, message):
  config = _config()
  config.sample.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=8, process_count=1)


def test_old_run_config_gets_the_exact_decoder_and_jacobi_defaults(tmp_path):
  """A config.json from before these keys restores: 'exact', and Jacobi
  options from the defaults (the whole sequence as one chunk)."""
  config = _config()
  checkpointing.save_config(config, str(tmp_path))
  path = tmp_path / checkpointing.CONFIG_FILE
  raw = json.loads(path.read_text())
  for key in ("decoder",) + config_lib.JACOBI_KEYS:
    del raw["sample"][key]
  path.write_text(json.dumps(raw))
  old = checkpointing.load_config(str(tmp_path))
  assert old.sample.decoder == "exact"
  options = decoders.jacobi_options(old, jacobi_tol=1e-4)
  assert options == jacobi.JacobiOptions((N, N), (N, N), 1e-4)
  with pytest.raises(config_lib.ConfigError, match="Unknown Jacobi"):
    decoders.jacobi_options(old, chunk=4)


def test_a_tolerance_below_bfloat16_resolution_is_warned_of(caplog):
  """bfloat16 activations round at 2^-8: a tolerance below that keeps
  chunks iterating long after they converge, so it is logged; the ImageNet configs (bf16)
  default above it, the float32 digits config below it without a word."""
  imagenet = helpers.load_config("imagenet", "res=64,size=tiny")
  assert imagenet.model.dtype == "bfloat16"
  for config, tol, warned in ((imagenet, None, False), (imagenet, 1e-3, True),
                              (_config(), 1e-3, False)):
    caplog.clear()
    with caplog.at_level("WARNING"):
      options = decoders.jacobi_options(config, jacobi_tol=tol)
    assert options.tol == (tol or 1e-2)
    assert ("bfloat16" in caplog.text) == warned, (config.model.dtype, tol)


# --------------------------------------------------------------- the CLIs ---


def test_sample_cli_decodes_with_jacobi_and_reports_iterations(
    trained_workdir, tmp_path):
  """`sample --decoder=jacobi` with flag overrides on the trained run: the
  flags reach the decoder (chunks, per-block limit) and the iterations per
  chunk are printed; block 0 is limited to 1."""
  out = tmp_path / "grid.png"
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "farmer_jax.sample",
       f"--workdir={trained_workdir}",
       "--num_samples=4", "--labels=1,2", "--decoder=jacobi",
       "--jacobi_chunk=2", "--jacobi_block_max_iters=0:1", f"--out={out}"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = np.load(str(tmp_path / "grid.npz"))
  assert data["images"].shape == (4, 8, 8, 1)
  line = next(l for l in proc.stdout.splitlines()
              if l.startswith("Jacobi iterations"))
  assert "mean [1.0, " in line and "chunks [2, 2], limits [1, 2]" in line, line


def test_evaluate_records_the_jacobi_decoder(trained_workdir):
  """`evaluate(decoder='jacobi')` writes `<step>_jacobi_chunk2.json` with
  the options and the sample metrics' iteration counts."""
  result = evaluate.evaluate(trained_workdir, num_samples=20,
                             batch_size=20, decoder="jacobi",
                             jacobi_overrides=dict(jacobi_chunk=2),
                             bayes_images=0, inception_weights="")
  assert result["decoder"] == "jacobi"
  assert list(result["jacobi"]["chunks"]) == [2, 2]
  iters = result["samples"]["jacobi_iterations_per_chunk"]
  assert len(iters) == 2 and all(1 <= v <= 2 for v in iters)
  path = os.path.join(trained_workdir, "eval",
                      f"{result['step']}_jacobi_chunk2.json")
  with open(path) as f:
    assert json.load(f)["samples"]["jacobi_iterations_per_chunk"] == iters
