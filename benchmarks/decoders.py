r"""Flow decoders of a trained run side by side: speed, error, sample quality.

For the run in `--workdir` (and its distilled student, `--student_workdir`),
decodes one set of sampled latents with every decoder:

* exact: `Farmer.decode`, sequential over tokens (KV-cached `nn.scan`);
* jacobi C:tol: the block-wise Jacobi inverse (`models/jacobi.py`) for each
  `--jacobi` setting (chunk `C`, 0 = the whole sequence; tolerance `tol`;
  the other Jacobi keys from the run's `config.sample`);
* student: the one-step student (`farmer_jax.distill`), if given;
* a last row, for reference, times the flow's forward pass
  (`Farmer.encode` of the exact decodes): one parallel pass of the flow,
  what the student costs too (same blocks, bidirectional attention), so
  the bound on any one-pass decoder of this flow.

The latents are `--num_samples` draws of the AR prior (the run's
`config.sample` options, `--cfg_scale` etc. override them; labels cycle over
the classes), the same for every decoder. Per decoder it prints one row of
one markdown table:

* images/s of the decode alone at each `--batch_sizes` (jitted, compile
  excluded, median of `--repeats` calls on the first `b` latents);
* RMS and max |error| of the decode (unclipped, `[-1, 1]` units) against
  the exact inverse of the same latents, over all of them;
* the mean Jacobi iterations per chunk (over images and blocks, and the
  slowest block's);
* sample class accuracy (binomial standard error) and the classifier
  Fréchet distance to the split's real images (standard error from
  `--bootstrap` resamples of the samples), as `farmer_jax.evaluate`
  computes them (`metrics.sample_quality`; the classifier is trained on
  first use and cached in the workdir); skipped for configs without one.

  python benchmarks/decoders.py --workdir=workdirs/digits \
      --jacobi=7:1e-3,0:1e-3,0:1e-4 --batch_sizes=1,16,256 --num_samples=500

With `--config` instead of `--workdir` (a model config, e.g.
`configs/imagenet.py:res=64,size=B`: an accelerator's ImageNet-64 shape),
the model has random weights, perturbed (`--perturb`) so that the flow is
not the identity its zero-initialised heads start as, and the latents are
N(0, 1) draws instead of the prior's. The student row is the untrained
student (the flow's own parameters, as distillation starts). That measures
speed and Jacobi convergence at the shape, not sample quality (no quality
columns):

  python benchmarks/decoders.py --config=configs/imagenet.py:res=64,size=B \
      --perturb=0.003 --jacobi=16:1e-2,0:1e-2 --batch_sizes=1,16 \
      --num_samples=64
"""
import functools
import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ml_collections import config_flags

import bench_lib
from farmer_jax import classifier
from farmer_jax import decoders
from farmer_jax import inference
from farmer_jax import metrics
from farmer_jax import nll
from farmer_jax import sampling
from farmer_jax import sharding
from farmer_jax.models import Farmer

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Instead of --workdir: a model config whose decoders "
    "are timed with perturbed random weights and N(0, 1) latents.",
    lock_config=False)
_PERTURB = flags.DEFINE_float("perturb", 0.01, "--config: the standard "
                              "deviation of the noise added to every "
                              "initial parameter.")
_STUDENT = flags.DEFINE_string("student_workdir", None, "Its distillation "
                               "run (optional).")
_JACOBI = flags.DEFINE_list("jacobi", ["0:1e-3"], "Jacobi settings, "
                            "chunk:tol pairs (chunk 0: the whole sequence).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "256"],
                                 "Batch sizes to time.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 500, "Latents for the "
                                    "errors and sample quality (0: only the "
                                    "timed ones, no sample quality).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per batch size.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 20, "Resamples for the "
                                  "Fréchet distance's standard error (0: "
                                  "none).")
_SPLIT = flags.DEFINE_string("split", None, "Real images for the Fréchet "
                             "distance (default: config.data.eval_split).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.register_multi_flags_validator(
    ["workdir", "config"], lambda f: (f["workdir"] is None) != (
        f["config"] is None), "Give one of --workdir (a trained run) and "
    "--config (random weights).")
inference.define_restore_flags()  # --mesh, --matmul_precision
inference.define_sampling_flags()  # --cfg_scale, --num_candidates, ...


FORWARD_ROW = "flow forward (one parallel pass, reference)"


def _decoders(run):
  """`{name: (jitted fn(variables, z, labels) -> (x, iterations|None),
  variables)}`, exact first."""
  def exact(variables, z, labels):
    return run.model.apply(variables, z, labels, method=Farmer.decode), None

  out = {"exact": (jax.jit(exact), run.variables)}
  for item in _JACOBI.value:
    chunk, _, tol = item.partition(":")
    tol = float(tol) if tol else run.config.sample.jacobi_tol
    decoder, variables = decoders.jacobi_decoder(
        run, jacobi_chunk=int(chunk), jacobi_tol=tol)

    def fn(variables, z, labels, decoder=decoder):
      x, stats = decoder(variables, z, labels)
      return x, stats["jacobi_iterations"]

    out[f"jacobi C={decoder.options.chunks[0]} tol={tol:g}"] = (
        jax.jit(fn), variables)
  if _STUDENT.value:
    student_fn, params = inference.load_decoder(_STUDENT.value, run)
  elif not run.workdir:  # random weights: the student as distillation starts
    student_fn = functools.partial(inference.student_decode,
                                   inference.create_student(run.config.model))
    params = run.variables["params"]["flow"]
  else:
    return out
  out["student"] = (jax.jit(lambda p, z, l: (student_fn(p, z, l), None)),
                    params)
  return out


def _random_run(config) -> inference.Run:
  """A run of `config`'s model with perturbed random weights (`--config`)."""
  if flags.FLAGS.matmul_precision:
    config.model.matmul_precision = flags.FLAGS.matmul_precision
  config, mesh = inference.create_mesh(
      config, mesh_shape=inference.parse_mesh(flags.FLAGS.mesh))
  model = Farmer(config.model)
  target = inference.abstract_params(model, config, mesh)
  params = bench_lib.perturbed_params(model, _PERTURB.value)
  params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
  return inference.Run(config, model, {"params": params}, 0, mesh, "")


def _latents(run, num: int):
  """`(z [num, N, d], labels [num])` drawn with the run's sampling options
  (and flags); N(0, 1) draws for a random-weights run."""
  if not run.workdir:
    rng = np.random.default_rng(_SEED.value)
    z = rng.standard_normal((num, run.model.num_tokens, run.model.token_dim))
    return z.astype(np.float32), (np.arange(num) % max(
        run.config.model.num_classes, 1)).astype(np.int32)
  kw = inference.sampling_kwargs(run.config.sample,
                                 **inference.sampling_flags())
  fn = jax.jit(functools.partial(sampling.sample_latents, run.model, **kw))
  per_call = -(-min(num, 256) // run.batch_shards) * run.batch_shards
  labels = np.arange(-(-num // per_call) * per_call) % max(
      run.config.model.num_classes, 1)
  zs = []
  with sharding.context(run.mesh, run.config):
    for i, start in enumerate(range(0, len(labels), per_call)):
      chunk = jax.device_put(labels[start:start + per_call].astype(np.int32),
                             run.batch_sharding)
      zs.append(np.asarray(fn(run.variables, jax.random.fold_in(
          jax.random.PRNGKey(_SEED.value), i), chunk)))
  return np.concatenate(zs)[:num], labels[:num].astype(np.int32)


def _decode_all(run, fn, variables, z, labels, batch: int):
  """`(x, iterations or None)` of all latents, `batch` at a time (padded)."""
  xs, its = [], []
  with sharding.context(run.mesh, run.config):
    for start in range(0, len(z), batch):
      zb, lb = z[start:start + batch], labels[start:start + batch]
      n = len(zb)
      zb = np.resize(zb, (batch,) + zb.shape[1:])
      lb = np.resize(lb, batch)
      x, it = fn(variables, jax.device_put(zb, run.batch_sharding),
                 jax.device_put(lb, run.batch_sharding))
      xs.append(np.asarray(x)[:n])
      its.append(None if it is None else np.asarray(it)[:n])
  return np.concatenate(xs), (None if its[0] is None else
                              np.concatenate(its))


def _images_per_s(run, fn, variables, z, labels, b: int) -> float:
  reps = -(-b // len(z))
  zb = jax.device_put(np.tile(z, (reps,) + (1,) * (z.ndim - 1))[:b],
                      run.batch_sharding)
  lb = jax.device_put(np.tile(labels, reps)[:b], run.batch_sharding)
  with sharding.context(run.mesh, run.config):
    jax.block_until_ready(fn(variables, zb, lb))  # compile
    seconds = bench_lib.median_seconds(lambda: fn(variables, zb, lb),
                                       _REPEATS.value)
  return b / seconds


def _quality(images, labels, clf, real_feats, rng) -> tuple:
  """`(accuracy, its SE, Fréchet distance, its bootstrap SE or None)`."""
  q = metrics.sample_quality(images, labels, clf, real_feats)
  acc = q["accuracy"]
  se_acc = math.sqrt(acc * (1 - acc) / len(images))
  se_fd = None
  if _BOOTSTRAP.value > 1:
    feats = classifier.features(*clf, images)
    draws = [classifier.frechet_distance(
        real_feats, feats[rng.integers(0, len(feats), len(feats))])
             for _ in range(_BOOTSTRAP.value)]
    se_fd = float(np.std(draws, ddof=1))
  return acc, se_acc, q["frechet"], se_fd


def _pm(value, se) -> str:
  return f"{value:.3g}" if se is None else f"{value:.3g} ± {se:.2g}"


def main(argv) -> None:
  del argv
  if _CONFIG.value is not None:
    run = _random_run(_CONFIG.value)
  else:
    run = inference.restore(_WORKDIR.value,
                            mesh_shape=inference.parse_mesh(flags.FLAGS.mesh),
                            matmul_precision=flags.FLAGS.matmul_precision)
  shards = run.batch_shards
  batch_sizes = [-(-int(b) // shards) * shards for b in _BATCH_SIZES.value]
  num = max(_NUM_SAMPLES.value, max(batch_sizes))
  z, labels = _latents(run, num)
  count = _NUM_SAMPLES.value or num  # latents the errors are measured on
  z_eval, l_eval = z[:count], labels[:count]
  config = run.config
  clf = real_feats = None
  if (_NUM_SAMPLES.value and run.workdir and config.classifier.steps > 0
      and config.model.num_classes >= 2):
    model, params, _ = classifier.load_or_train(config, _WORKDIR.value)
    clf = (model, params)
    real, _ = classifier.real_images(config,
                                     _SPLIT.value or config.data.eval_split)
    real_feats = classifier.features(*clf, real)
  decode_batch = max(batch_sizes)
  rows, exact_x, exact_speed = [], None, None
  for name, (fn, variables) in _decoders(run).items():
    speeds = [_images_per_s(run, fn, variables, z, labels, b)
              for b in batch_sizes]
    x, iterations = _decode_all(run, fn, variables, z_eval, l_eval,
                                decode_batch)
    if exact_x is None:
      exact_x, exact_speed = x, speeds
    err = x - exact_x
    row = [name] + speeds + [exact_speed[-1] and speeds[-1] / exact_speed[-1],
                             float(np.sqrt(np.mean(np.square(err)))),
                             float(np.abs(err).max())]
    if iterations is None:
      row += ["", ""]
    else:
      per_block = iterations.mean(0)
      row += [float(per_block.mean()), float(per_block.max())]
    if clf is not None:
      images = nll.to_uint8(jnp.clip(jnp.asarray(x), -1.0, 1.0))
      acc, se_acc, fd, se_fd = _quality(np.asarray(images), l_eval, clf,
                                        real_feats,
                                        np.random.default_rng(0))
      row += [_pm(acc, se_acc), _pm(fd, se_fd)]
    rows.append(row)
  encode = jax.jit(lambda v, x, l: run.model.apply(
      v, x, l, method=Farmer.encode)[0])
  speeds = [_images_per_s(run, encode, run.variables,
                          exact_x.astype(np.float32), l_eval, b)
            for b in batch_sizes]
  rows.append([FORWARD_ROW] + speeds + [speeds[-1] / exact_speed[-1]]
              + [""] * (len(rows[0]) - len(speeds) - 2))
  header = (["decoder"] + [f"images/s @{b}" for b in batch_sizes]
            + [f"speed-up @{batch_sizes[-1]}", "RMS error vs exact",
               "max abs error vs exact", "iterations/chunk (mean)",
               "iterations/chunk (slowest block)"])
  if clf is not None:
    header += ["sample accuracy", "Fréchet distance"]
  w = inference.sampling_kwargs(config.sample,
                                **inference.sampling_flags())["cfg_scale"]
  source = (f"run {_WORKDIR.value} step {run.step}" if run.workdir else
            f"random weights (perturbed by {_PERTURB.value:g}), N(0, 1) "
            "latents")
  print(f"Device: {bench_lib.device_name()}; {source} (N = "
        f"{run.model.num_tokens} tokens of d = "
        f"{run.model.token_dim}, {config.model.af_blocks} flow blocks); "
        f"errors{' and quality' if clf else ''} over {count} latents"
        f"{f' sampled at w = {w:g}' if run.workdir else ''}; "
        f"median of {_REPEATS.value} calls.")
  print(bench_lib.table(header, rows))


if __name__ == "__main__":
  app.run(main)
