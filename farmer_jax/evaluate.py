r"""Evaluates a trained run: exact bits/dim and sample quality, one JSON line.

  python -m farmer_jax.evaluate --workdir=workdirs/digits [--split=test] \
      [--sweep] [--num_samples=1000] [--cfg_scale=1.0]

Restores the latest checkpoint's EMA parameters (or `--step`) and reports:
* exact bits/dim of the whole split under uniform dequantisation with its
  standard error, split into flow log-det, informative and redundant parts
  (`bpd = bpd_flow + bpd_I + bpd_R + log2(127.5)`);
* for class-conditional models, the accuracy of the model's own Bayes-rule
  classifier `argmax_c log p(x | c)` on `config.eval_bayes_images` (or
  `--bayes_images`) images of the split, dequantised as for bits/dim
  (`bayes_accuracy`, `bayes_num_images`);
* sample quality (farmer_jax/classifier.py, trained on first use and
  cached in the workdir): class accuracy of class-conditional samples and
  the Fréchet distance of their classifier features to the split's real
  images, at `config.sample.cfg_scale` (or `--cfg_scale`); the real
  train-vs-split distance is given as the floor;
* how many guided latent dimensions fell back to `p_c` ('rejection' with
  no accepted try, 'closed_form' on an improper target):
  `samples.guidance_fallbacks` and `guidance_fallback_fraction`;
* with `--sweep`, the same at every `w` of `config.sample.cfg_sweep`: a
  CSV table and a plot (accuracy and Fréchet distance vs `w`).
Writes `<workdir>/eval/<step>.json` (and `cfg_sweep_<step>.csv/.png`).
`--student_workdir=S` (or `--decoder=student`, S defaulting to
`<workdir>/distill`) decodes the samples with the distilled one-step
student (farmer_jax.distill) instead of the exact inverse, on the same
latents (same seeds), and writes `<step>_student.json`: run it with and
without to see the student's quality cost. `--decoder=jacobi` decodes
them with the block-wise Jacobi inverse (models/jacobi.py; `--jacobi_chunk`,
`--jacobi_tol`, `--jacobi_max_iters`, `--jacobi_block_chunks`,
`--jacobi_block_max_iters` override `config.sample`), records its options
under `jacobi` and its mean iterations per chunk per flow block under
`samples.jacobi_iterations_per_chunk`, and writes `<step>_jacobi.json`
(the Jacobi options given name the file, e.g.
`<step>_jacobi_chunk2_tol0.0001.json`). Default: `config.sample.decoder`.
Every sampling option has a flag (`--logit_temp`, `--resample_temp`,
`--r_var_scale`, ...: see `farmer_jax.sample`); the JSON records all
options used under `sampling`, and the ones given (but `--cfg_scale`)
name the file, e.g. `<step>_logit_temp0.5.json`.
* FID (and the Inception Score, if the weights have the output layer)
  with Inception-v3 (farmer_jax/inception.py) when `config.inception.
  weights` or `--inception_weights` names the `.npz` made by
  `python -m farmer_jax.inception`; the real side is `config.inception.
  num_real` images of the split (cached in `<workdir>/inception/`).
ImageNet configs have no classifier (`classifier.steps = 0`); without
Inception weights the sample metrics are skipped and the JSON says why.
"""
import dataclasses
import functools
import io
import json

from absl import app
from absl import flags
from absl import logging
import jax
from matplotlib import figure
import numpy as np

from farmer_jax import classifier
from farmer_jax import config_lib
from farmer_jax import decoders
from farmer_jax import fileio
from farmer_jax import inception
from farmer_jax import inference
from farmer_jax import input_pipeline
from farmer_jax import metrics
from farmer_jax import pretrained
from farmer_jax import sharding

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The flags of this CLI (defined only when run as a program)."""
  pretrained.define_workdir_flags()  # --workdir, --pretrained=digits
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  inference.define_restore_flags()  # --mesh=-1,1,1, --matmul_precision
  flags.DEFINE_string("split", None, "Split (default: config.data."
                      "eval_split).")
  flags.DEFINE_integer("num_samples", None, "Samples for sample quality "
                       "(default: config.sample.num_eval_samples; 0: skip).")
  inference.define_sampling_flags()  # --cfg_scale, --num_candidates, ...
  flags.DEFINE_bool("sweep", False, "Also sweep w over config.sample."
                    "cfg_sweep: table + plot.")
  flags.DEFINE_integer("batch_size", 250, "Samples per jitted call.")
  flags.DEFINE_integer("seed", 0, "Sampling and dequantisation seed.")
  # --decoder=exact|jacobi|student, --student_workdir (decode samples with
  # the distilled student of that workdir), --jacobi_chunk, --jacobi_tol, ...
  decoders.define_flags()
  flags.DEFINE_string("inception_weights", None, "FID / IS Inception-v3 "
                      ".npz (default: config.inception.weights; '' skips). "
                      "Make it with `python -m farmer_jax.inception`.")
  flags.DEFINE_integer("bayes_images", None, "Split images for the Bayes-"
                       "rule accuracy argmax_c log p(x | c) (default: "
                       "config.eval_bayes_images; 0: skip).")


def exact_bpd(run, split: str, seed: int) -> dict:
  """Exact bits/dim of the whole `split` (uniform dequantisation)."""
  eval_fn = jax.jit(functools.partial(metrics.eval_terms, run.model,
                                      num_dims=config_lib.num_dims(run.config)))
  batches = metrics.eval_batches(run.config, split, run.batch_sharding, -1)
  with sharding.context(run.mesh, run.config):
    return metrics.evaluate_bpd(eval_fn, run.variables["params"], batches,
                                   jax.random.PRNGKey(seed))


def bayes_accuracy(run, split: str, seed: int, num_images: int) -> dict:
  """Accuracy of `argmax_c log p(x | c)` on `num_images` of `split`.

  Dequantised with the same seed and batches as `exact_bpd`, so the images
  are the ones whose bits/dim it reports. Returns `{bayes_accuracy,
  bayes_num_images}`, or `{bayes: 'skipped: why'}`.
  """
  if run.config.model.num_classes < 2:
    return dict(bayes="skipped: not a class-conditional model")
  if num_images <= 0:
    return dict(bayes="skipped: bayes_images = 0 (config.eval_bayes_images "
                "/ --bayes_images)")
  log_probs_fn = jax.jit(functools.partial(
      metrics.class_log_probs, run.model,
      num_classes=run.config.model.num_classes))
  num_batches = -(-num_images // run.config.eval_batch_size)
  batches = metrics.eval_batches(run.config, split, run.batch_sharding,
                                    num_batches)
  with sharding.context(run.mesh, run.config):
    return metrics.bayes_accuracy(log_probs_fn, run.variables["params"],
                                     batches, jax.random.PRNGKey(seed),
                                     num_images)


def sample_quality_at(run, clf, real_features, cfg_scales, num_samples: int,
                      seed: int, batch_size: int, decoder=None,
                      inception_eval=None, inception_ref=None,
                      **overrides) -> list:
  """Sample-quality metrics of `num_samples` samples at each `w`.

  `clf` + `real_features` give class accuracy and the classifier Fréchet
  distance (`metrics.sample_quality`); `inception_eval` +
  `inception_ref` (mu, sigma) give FID and, with logits, IS. Either may be
  None. `overrides` are sampling options (e.g. `logit_temp`) that replace
  the run's `config.sample` ones.
  """
  labels = np.arange(num_samples) % max(run.config.model.num_classes, 1)
  rows = []
  for w in cfg_scales:
    stats = {}
    images = inference.generate(run, labels, seed, batch_size=batch_size,
                                denoise=run.config.sample.denoise,
                                decoder=decoder, progress=True, stats=stats,
                                cfg_scale=float(w), **overrides)
    row = dict(cfg_scale=float(w), num_samples=int(len(images)), **stats)
    if clf is not None:
      row.update(metrics.sample_quality(images, labels, clf,
                                           real_features))
    if inception_eval is not None:
      row.update(inception_eval.metrics(images, *inception_ref))
    rows.append(row)
    logging.info("w=%g: %s", w, row)
  return rows


def inception_reference(run, split: str, ev, num_real: int):
  """(mu, sigma) of Inception features of `num_real` real `split` images.

  The images are a fixed random subset (all of them for `num_real = -1`);
  cached in `<workdir>/inception/` per split, count and weights file.
  """
  source = input_pipeline.get_source(run.config, split)
  n = len(source) if num_real < 0 else min(num_real, len(source))
  # A fixed random subset: TFDS splits may be stored sorted by class.
  index = np.sort(np.random.default_rng(0).permutation(len(source))[:n])
  path = fileio.path(run.workdir) / "inception" / f"ref_{split}_{n}.npz"
  if path.exists():
    cached = fileio.load_npz(path)
    if str(cached["weights_id"]) == ev.weights_id:
      return cached["mu"], cached["sigma"]
  logging.info("Inception reference statistics of %d %s images...", n, split)
  chunk = 10 * ev.batch_size

  def chunks():
    for i in range(0, n, chunk):
      yield np.stack([source[int(j)]["image"] for j in index[i:i + chunk]])
      logging.info("  %d / %d real images", min(i + chunk, n), n)

  mu, sigma = ev.moments(chunks()).stats()
  if jax.process_index() == 0:
    fileio.save_npz(path, atomic=True, mu=mu, sigma=sigma,
                    weights_id=ev.weights_id)
  return mu, sigma


def write_sweep(rows: list, path_prefix) -> None:
  """`rows` as CSV and as a plot (`<prefix>.csv`, `.png`; local or gs://):
  one panel per metric vs w."""
  names = [k for k in ("accuracy", "frechet", "fid", "inception_score")
           if k in rows[0]]
  lines = [",".join(["cfg_scale"] + names + ["num_samples"])]
  lines += [",".join([str(r["cfg_scale"])] + [f"{r[k]:.4f}" for k in names]
                     + [str(r["num_samples"])]) for r in rows]
  fileio.write_text(f"{path_prefix}.csv", "\n".join(lines) + "\n")
  ws = [r["cfg_scale"] for r in rows]
  labels = dict(accuracy="sample class accuracy",
                frechet="Fréchet distance (classifier)",
                fid="FID (Inception-v3)", inception_score="Inception Score")
  # The Figure API needs no pyplot backend (headless, and leaves notebooks'
  # inline backend alone).
  fig = figure.Figure(figsize=(4 * len(names), 3))
  axes = np.atleast_1d(fig.subplots(1, len(names)))
  for ax, k in zip(axes, names):
    ax.plot(ws, [r[k] for r in rows], "o-")
    ax.set(xlabel="cfg scale w", ylabel=labels[k])
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  fileio.write_bytes(f"{path_prefix}.png", buffer.getvalue())


def _suffix(name: str, value) -> str:
  """`_logit_temp0.5`, `_proposalbalance`: an override in a file name."""
  return f"_{name}{value:g}" if isinstance(value, float) else f"_{name}{value}"


def _jacobi_suffix(key: str, value) -> str:
  """`_chunk4`, `_tol0.001`, `_block_chunks0-1.1-2`: a Jacobi override."""
  name = key[len("jacobi_"):]
  if isinstance(value, (tuple, list)):
    return f"_{name}" + ".".join(f"{t}-{v}" for t, v in value)
  return _suffix(name, float(value) if name == "tol" else value)


def evaluate(workdir: str, *, step=None, split=None, num_samples=None,
             cfg_scale=None, sweep: bool = False, batch_size: int = 250,
             seed: int = 0, student_workdir=None, decoder=None,
             jacobi_overrides=None,
             inception_weights=None, bayes_images=None, mesh=None,
             matmul_precision=None, **sampling_overrides) -> dict:
  """Everything the CLI reports, as a dict (also written as JSON).

  With `student_workdir`, samples are decoded by the distilled one-step
  student instead of the exact inverse: same seeds, so the same latents,
  and the JSON goes to `eval/<step>_student.json`. `decoder` ('exact',
  'jacobi', 'student'; None: `config.sample.decoder`, or 'student' with
  `student_workdir`) picks the flow inverse; 'jacobi' takes
  `jacobi_overrides` (`config_lib.JACOBI_KEYS` -> value) and writes
  `eval/<step>_jacobi[_<overrides>].json`. `inception_weights`
  overrides `config.inception.weights` ('' skips FID / IS); `bayes_images`
  overrides `config.eval_bayes_images` (0 skips the Bayes-rule accuracy).
  `mesh` (`(data, fsdp, tensor)` or '-1,1,1') replaces the run's mesh,
  `matmul_precision` its `config.model.matmul_precision`.
  `sampling_overrides` (`sampling.SamplingOptions` fields, e.g.
  `logit_temp=0.5`; None = unset) replace `config.sample`'s options; the
  JSON records every option used (`sampling`) and goes to a file named
  after the overrides, e.g. `eval/<step>_logit_temp0.5.json`.
  """
  if isinstance(mesh, str):
    mesh = inference.parse_mesh(mesh)
  run = inference.restore(workdir, step, mesh_shape=mesh,
                          matmul_precision=matmul_precision)
  config = run.config
  overrides = {k: v for k, v in sampling_overrides.items() if v is not None}
  # Bad sampling options fail here, before anything is computed.
  options = inference.sampling_kwargs(config.sample, cfg_scale=cfg_scale,
                                      **overrides)
  inc = config.inception
  if inception_weights is None:
    inception_weights = inc.weights
  # Bad weights fail here, before any sampling.
  ev = (inception.Evaluator(inception_weights, inc.batch_size)
        if inception_weights else None)
  jacobi_overrides = {k: v for k, v in (jacobi_overrides or {}).items()
                      if v is not None}
  name = decoder or ("student" if student_workdir else config.sample.decoder)
  # Bad decoder options fail here too; None is the exact inverse.
  decoder = decoders.make_decoder(run, name, student_workdir=student_workdir,
                                   **jacobi_overrides)
  split = split or config.data.eval_split
  result = dict(step=run.step, split=split, decoder=name,
                **exact_bpd(run, split, seed))
  if name == "jacobi":
    result["jacobi"] = dataclasses.asdict(decoder[0].options)
  result.update(bayes_accuracy(
      run, split, seed,
      config.eval_bayes_images if bayes_images is None else bayes_images))
  # Non-default decoders and sampling options get their own files.
  suffix = ("" if name == "exact" else f"_{name}") + "".join(
      _jacobi_suffix(k, v) for k, v in jacobi_overrides.items()) + "".join(
          _suffix(k, v) for k, v in options.items() if k in overrides)
  eval_dir = fileio.path(workdir) / "eval"
  n = config.sample.num_eval_samples if num_samples is None else num_samples
  has_clf = config.classifier.steps > 0 and config.model.num_classes >= 2
  if not has_clf:
    result["classifier"] = ("skipped: no classifier for this config "
                            "(classifier.steps = 0 or unconditional)")
  if ev is None:
    result["inception"] = ("skipped: no Inception-v3 weights "
                           "(config.inception.weights / --inception_weights;"
                           " python -m farmer_jax.inception)")
  if n <= 0:
    result["samples"] = "skipped: num_samples = 0"
  elif not has_clf and ev is None:
    result["samples"] = "skipped: no classifier and no Inception weights"
  else:
    clf = real_feats = ref = None
    if has_clf:
      model, params, info = classifier.load_or_train(config, workdir)
      clf = (model, params)
      real, _ = classifier.real_images(config, split)
      real_feats = classifier.features(*clf, real)
    ref_split = inc.reference_split or split
    if ev is not None:
      ref = inception_reference(run, ref_split, ev, inc.num_real)
    w = options["cfg_scale"]
    scales = sorted(set(config.sample.cfg_sweep) | {w}) if sweep else [w]
    result["sampling"] = options  # at w; a sweep varies cfg_scale only.
    result["sampling_temperatures"] = dict(
        logit_temp=options["logit_temp"], scale_temp=options["scale_temp"])
    rows = sample_quality_at(run, clf, real_feats, scales, n, seed,
                             batch_size, decoder, ev, ref, **overrides)
    result["samples"] = dict(next(r for r in rows if r["cfg_scale"] == w))
    if has_clf:
      train_real, _ = classifier.real_images(
          config, config.data.train_split, limit=len(real))
      result["samples"]["classifier_test_accuracy"] = info["test_accuracy"]
      result["samples"]["frechet_real_train_vs_split"] = (
          classifier.frechet_distance(
              real_feats, classifier.features(*clf, train_real)))
    if ev is not None:
      result["inception"] = dict(
          weights=inception_weights, reference_split=ref_split,
          inception_score="computed" if ev.with_logits else (
              "skipped: these weights have no 1008-way output layer "
              "(convert NVlabs' inception-2015-12-05.pt for IS)"))
    if sweep:
      result["cfg_sweep"] = rows
      if jax.process_index() == 0:
        write_sweep(rows, eval_dir / f"cfg_sweep_{run.step}{suffix}")
  if jax.process_index() == 0:  # every process holds the same result
    fileio.write_json(eval_dir / f"{run.step}{suffix}.json", result)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = pretrained.resolve(FLAGS.workdir, FLAGS.pretrained)
  result = evaluate(workdir, step=FLAGS.step, split=FLAGS.split,
                    num_samples=FLAGS.num_samples, sweep=FLAGS.sweep,
                    batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                    student_workdir=FLAGS.student_workdir,
                    decoder=FLAGS.decoder,
                    jacobi_overrides=decoders.jacobi_flags(),
                    inception_weights=FLAGS.inception_weights,
                    bayes_images=FLAGS.bayes_images, mesh=FLAGS.mesh,
                    matmul_precision=FLAGS.matmul_precision,
                    **inference.sampling_flags())
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
