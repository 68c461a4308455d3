"""One-step distillation (spec section 8): a parallel student of the AF inverse.

The student must be non-causal and run one pass per block (no scan over
tokens); distillation through the real entry point (the session's shared
tiny teacher, then `distill`, stopped and resumed via `main`) must cut the
reconstruction error well below its value at the teacher-weight
initialisation, bring decoded samples towards the exact inverse's, and run
the training loop's guard (a NaN batch is skipped) and EMA.
"""
import functools
import os
import subprocess
import sys
import types
from unittest import mock

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import helpers
from farmer_jax import checkpointing
from farmer_jax import distill
from farmer_jax import evaluate
from farmer_jax import inference
from farmer_jax import input_pipeline
from farmer_jax import main as main_lib
from farmer_jax import sharding
from farmer_jax.models import Farmer
from farmer_jax.models import flow as flow_lib
from farmer_jax.models.student import StudentDecoder

DISTILL_STEPS = 100
NAN_STEP = 3  # config.debug_nonfinite_steps: this batch becomes NaN.


def _config(**overrides):
  config = helpers.load_config("digits_distill", "tiny")
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def random_student():
  """A tiny student with random weights (also a valid teacher flow tree)."""
  config = _config()
  student = distill.create_student(config.model)
  z = jax.random.normal(jax.random.PRNGKey(0),
                        (4, student.num_tokens, student.token_dim))
  labels = jnp.zeros((4,), jnp.int32)
  params = jax.jit(lambda: helpers.randomize(student.init(
      {"params": jax.random.PRNGKey(1)}, z, labels)["params"], 2, 0.1))()
  teacher_flow = flow_lib.AutoregressiveFlow(
      student.cfg, student.num_tokens, student.token_dim)
  return config, student, teacher_flow, params, z, labels


def _primitives(jaxpr, out):
  """(name, params) of every equation, recursing into sub-jaxprs."""
  for eqn in jaxpr.eqns:
    out.append((eqn.primitive.name, eqn.params))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _primitives(sub, out)
  return out


def _scan_lengths(fn, *args):
  eqns = _primitives(jax.make_jaxpr(fn)(*args).jaxpr, [])
  assert "while" not in {name for name, _ in eqns}
  return [p["length"] for name, p in eqns if name == "scan"]


def test_student_runs_one_pass_per_block(random_student):
  config, student, teacher_flow, params, z, labels = random_student
  student_lengths = _scan_lengths(
      functools.partial(distill.student_decode, student), params, z, labels)
  exact_lengths = _scan_lengths(
      lambda p, z, l: teacher_flow.apply({"params": p}, z, l,
                                         method="inverse"), params, z, labels)
  # Both run one scan over the stacked blocks. Inside it the student's block
  # holds only the scan over its layers; the exact inverse's block holds a
  # scan over the N tokens (with the layer scan inside that).
  layers, blocks = config.model.af_layers_per_block, config.model.af_blocks
  n = student.num_tokens
  assert n not in (layers, blocks)  # else the counts below could not tell
  assert sorted(student_lengths) == sorted([blocks, layers])
  assert n in exact_lengths and blocks in exact_lengths, exact_lengths


def test_student_has_the_teacher_flow_param_tree(random_student):
  """So the student starts as a copy of the teacher's `params['flow']`."""
  _, student, teacher_flow, _, z, labels = random_student
  rng = {"params": jax.random.PRNGKey(0)}
  shapes = lambda module: jax.tree.map(lambda a: a.shape, nn.meta.unbox(
      jax.eval_shape(module.init, rng, z, labels)["params"]))
  assert shapes(student) == shapes(teacher_flow)


def test_student_attention_is_bidirectional(random_student):
  """Block output token 1 moves when the last input token moves.

  In the exact (causal) inverse of the same block it cannot: token 1 depends
  only on tokens 0 and 1.
  """
  _, student, teacher_flow, params, z, labels = random_student
  moved = z.at[:, -1].add(1.0)

  @jax.jit
  def both(y):
    fast = student.apply({"params": params}, 0, y, labels,
                         method=StudentDecoder.block_inverse)
    exact = teacher_flow.apply(
        {"params": params}, y, labels,
        method=lambda m, y, l: m.block_apply(0, 'inverse', y, l))
    return fast, exact

  (fast0, exact0), (fast1, exact1) = both(z), both(moved)
  assert float(jnp.abs(fast1[:, 1] - fast0[:, 1]).max()) > 1e-3
  np.testing.assert_array_equal(exact1[:, :-1], exact0[:, :-1])
  np.testing.assert_array_equal(fast1[:, 0], fast0[:, 0])  # token 0 = y_0


def _run_main(config_path, workdir, *overrides):
  argv = ["main", f"--config={config_path}", f"--workdir={workdir}",
          *overrides]
  # config_flags reads `--config.*` overrides from sys.argv itself.
  with mock.patch.object(sys, "argv", argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
      main_lib.main(argv[:1])
    finally:
      flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def runs(trained_workdir, tmp_path_factory):
  """The shared tiny teacher -> distil to DISTILL_STEPS / 2 -> resume via
  `main`, with a NaN batch injected at step 3 (skipped, as in training)."""
  teacher_dir = trained_workdir  # trained on (-1, 1, 1); restored on (2, 4, 1)
  student_dir = str(tmp_path_factory.mktemp("student"))
  overrides = dict(log_every=25, eval_every=DISTILL_STEPS, num_eval_batches=1,
                   ckpt_every=DISTILL_STEPS // 2, mesh_shape=(2, 4, 1),
                   debug_nonfinite_steps=(NAN_STEP,))
  config = _config(**overrides)
  config.distill.update(dict(teacher_workdir=teacher_dir,
                             total_steps=DISTILL_STEPS))
  init_eval = distill.distill_and_evaluate(config, student_dir,
                                           stop_at_step=DISTILL_STEPS // 2)
  _, stopped = distill.load_student(config, student_dir)
  _run_main(os.path.join(helpers.REPO, "configs", "digits_distill.py:tiny"),
            student_dir, f"--config.distill.teacher_workdir={teacher_dir}",
            f"--config.distill.total_steps={DISTILL_STEPS}",
            *(f"--config.{k}={v}".replace(" ", "")
              for k, v in overrides.items()))
  return config, teacher_dir, student_dir, init_eval, stopped


@pytest.fixture(scope="module")
def decoded(runs):
  """Exact and student decodes of `F(x)` for one tiny test batch."""
  config, _, student_dir, _, _ = runs
  run = distill.load_teacher(config)
  teacher = run.variables["params"]
  # The sampler's entry (`sample --decoder=student`): any object with .config.
  decode_fn, student_params = distill.load_decoder(
      student_dir, types.SimpleNamespace(config=config))
  batch = next(iter(input_pipeline.create_eval_iterator(
      config, "test", process_index=0, process_count=1, num_batches=1)))
  x = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0
  labels = jnp.asarray(batch["label"])

  @jax.jit
  def decode(teacher, student_params):
    model = run.model
    z, _ = model.apply({"params": teacher}, x, labels, method=Farmer.encode)
    exact = model.apply({"params": teacher}, z, labels, method=Farmer.decode)
    return exact, decode_fn(student_params, z, labels)

  return (x,) + decode(teacher, student_params)


def test_distill_checkpoints_and_resumes_through_main(runs):
  _, _, student_dir, init_eval, stopped = runs
  steps = sorted(int(d) for d in os.listdir(
      os.path.join(student_dir, "checkpoints")) if d.isdigit())
  assert steps == [DISTILL_STEPS // 2, DISTILL_STEPS]
  assert init_eval["num_images"] == 32  # the step-0 evaluation
  assert os.path.exists(os.path.join(
      student_dir, "images", f"student_reconstructions_{DISTILL_STEPS}.png"))


def test_distillation_cuts_reconstruction_error(runs, decoded):
  _, _, _, init_eval, _ = runs
  x, _, fast = decoded
  after = float(jnp.sqrt(jnp.mean(jnp.square(fast - x))))
  # Same 32 test images, fixed seeds. The tiny student learns slowly (about
  # 0.126 -> 0.074 in 100 steps, 0.06 after 300); digits: README table.
  assert after < 0.75 * init_eval["recon_rmse"], (init_eval, after)


def test_student_and_exact_decoder_agree_in_shape_and_range(decoded):
  x, exact, fast = decoded
  assert fast.shape == exact.shape == x.shape
  assert fast.dtype == exact.dtype == jnp.float32
  np.testing.assert_allclose(exact, x, atol=1e-4)  # the exact inverse
  # Both in the pixel range [-1, 1]; the student (not clipped, like
  # `Farmer.decode`) up to its error, which has a few large outliers.
  assert float(jnp.mean(jnp.abs(fast) > 1.1)) < 0.05
  assert float(jnp.mean(jnp.abs(fast - exact))) < 0.1


def test_uniform_latent_noise_is_a_new_draw_in_range_each_step():
  """'uniform' (the paper's s ~ U[0, 0.3] per batch): one s per step key,
  inside [0, latent_noise], distributed uniformly (SciPy's KS test); 'fixed'
  is latent_noise at every step."""
  keys = jax.vmap(lambda t: jax.random.fold_in(jax.random.PRNGKey(0), t))(
      jnp.arange(2000))
  draw = lambda dist: np.asarray(jax.vmap(
      lambda k: distill.latent_noise_scale(k, 0.3, dist))(keys))
  s = draw("uniform")
  assert s.shape == (2000,) and len(np.unique(s)) == 2000
  assert s.min() >= 0.0 and s.max() <= 0.3
  assert scipy.stats.kstest(s / 0.3, "uniform").pvalue > 1e-3
  np.testing.assert_array_equal(draw("fixed"), np.float32(0.3))


def test_unknown_latent_noise_dist_is_refused(tmp_path):
  config = _config()
  config.distill.latent_noise_dist = "gaussian"
  with pytest.raises(ValueError, match=r"latent_noise_dist='gaussian'.*"
                     r"'fixed'.*'uniform'"):
    distill.validate(config, str(tmp_path / "student"))


def test_teacher_workdir_is_refused_as_the_students(runs):
  config, teacher_dir, _, _, _ = runs
  with pytest.raises(ValueError, match="own --workdir"):
    distill.validate(config, teacher_dir)


def test_sample_cli_with_the_student_decoder(runs, tmp_path):
  """`farmer_jax.sample --decoder=student` end to end, on 2 devices with
  `--mesh` (FSDP) although the teacher trained on 8, data parallel."""
  _, teacher_dir, student_dir, _, _ = runs
  out = str(tmp_path / "student.png")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=helpers.xla_flags(2))
  proc = subprocess.run(
      [sys.executable, "-m", "farmer_jax.sample", f"--workdir={teacher_dir}",
       "--decoder=student", f"--student_workdir={student_dir}",
       "--mesh=1,-1,1",
       "--num_samples=4", "--cfg_scale=1", "--num_candidates=2",
       f"--out={out}"], cwd=helpers.REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  images = np.load(str(tmp_path / "student.npz"))["images"]
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
  assert images.std() > 5


def _student_state(config, student_dir):
  """The student's whole TrainState (params, optimizer, EMA, counters)."""
  student = distill.create_student(config.model)
  mesh = sharding.create_mesh(config)
  _, abstract, _ = distill._state_fns(  # pylint: disable=protected-access
      student, distill.create_optimizer(config)[0], mesh, config)
  ckpt = checkpointing.Checkpointer(student_dir, config, read_only=True)
  try:
    return ckpt.restore_state(None, abstract)
  finally:
    ckpt.close()


def test_distillation_skips_a_nonfinite_step_and_keeps_an_ema(runs):
  """The shared loop's guard and EMA: the NaN batch is skipped (counted,
  params finite), the EMA differs from the raw params and is what
  `load_student` hands to the sampler."""
  config, _, student_dir, _, _ = runs
  state = _student_state(config, student_dir)
  assert int(state.step) == DISTILL_STEPS
  assert int(state.nonfinite_total) == 1
  assert all(np.isfinite(np.asarray(a)).all()
             for a in jax.tree.leaves(state.params))
  gap = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
            zip(jax.tree.leaves(state.params),
                jax.tree.leaves(state.ema_params)))
  assert gap > 1e-6
  _, loaded = distill.load_student(config, student_dir)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_student_decodes_sampled_latents_closer_to_the_exact_inverse(runs):
  """What distillation changes on samples: on latents drawn from the prior
  (not the data latents it trained on), the student's images move towards
  the exact inverse's, compared with the student before training (the
  teacher's flow weights run in one parallel pass)."""
  config, teacher_dir, student_dir, _, _ = runs
  run = inference.restore(teacher_dir, config=config)
  labels = np.arange(32) % 10
  exact = inference.generate(run, labels, seed=0, cfg_scale=0.0)
  trained = inference.generate(
      run, labels, seed=0, cfg_scale=0.0,
      decoder=inference.load_decoder(student_dir, run))
  untrained = inference.generate(
      run, labels, seed=0, cfg_scale=0.0,
      decoder=(functools.partial(distill.student_decode,
                                 distill.create_student(config.model)),
               run.variables["params"]["flow"]))
  err = lambda a: float(np.mean(np.abs(a.astype(np.float64) - exact)))
  # Measured after 100 tiny steps: 8.31 vs 9.67 (uint8 levels), 0.86x.
  assert err(trained) < 0.9 * err(untrained), (err(trained), err(untrained))


def test_evaluate_decodes_samples_with_the_student(runs):
  """`evaluate --student_workdir`: sample metrics of student decodes, in
  their own JSON file."""
  _, teacher_dir, student_dir, _, _ = runs
  fast = evaluate.evaluate(teacher_dir, num_samples=20, batch_size=20,
                           student_workdir=student_dir, bayes_images=0)
  assert fast["decoder"] == "student"
  assert 0 <= fast["samples"]["accuracy"] <= 1
  assert np.isfinite(fast["samples"]["frechet"])
  assert os.path.exists(os.path.join(teacher_dir, "eval",
                                     f"{fast['step']}_student.json"))
