r"""Evaluates a trained run: exact bits/dim and sample quality, one JSON line.

  python -m farmer_jax.evaluate --workdir=workdirs/digits [--split=test] \
      [--sweep] [--num_samples=1000] [--cfg_scale=1.0]

Restores the latest checkpoint's EMA parameters (or `--step`) and reports:
* exact bits/dim of the whole split under uniform dequantisation with its
  standard error, split into flow log-det, informative and redundant parts
  (`bpd = bpd_flow + bpd_I + bpd_R + log2(127.5)`);
* sample quality (farmer_jax/classifier.py, trained on first use and
  cached in the workdir): class accuracy of class-conditional samples and
  the Fréchet distance of their classifier features to the split's real
  images, at `config.sample.cfg_scale` (or `--cfg_scale`); the real
  train-vs-split distance is given as the floor;
* with `--sweep`, the same at every `w` of `config.sample.cfg_sweep`: a
  CSV table and a plot (accuracy and Fréchet distance vs `w`).
Writes `<workdir>/eval/<step>.json` (and `cfg_sweep_<step>.csv/.png`).
`--student_workdir=S` decodes the samples with the distilled one-step
student (farmer_jax.distill) instead of the exact inverse, on the same
latents (same seeds), and writes `<step>_student.json`: run it with and
without to see the student's quality cost.
ImageNet configs have no classifier (`classifier.steps = 0`): sample
quality is skipped and says so; FID needs Inception-v3 weights, which this
project does not load (see README).
"""
import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from matplotlib import figure
import numpy as np

from farmer_jax import classifier
from farmer_jax import evaluation
from farmer_jax import inference
from farmer_jax import sharding
from farmer_jax import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The flags of this CLI (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "The training run's --workdir.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("split", None, "Split (default: config.data."
                      "eval_split).")
  flags.DEFINE_integer("num_samples", None, "Samples for sample quality "
                       "(default: config.sample.num_eval_samples; 0: skip).")
  flags.DEFINE_float("cfg_scale", None, "Guidance weight w (default: "
                     "config.sample.cfg_scale).")
  flags.DEFINE_bool("sweep", False, "Also sweep w over config.sample."
                    "cfg_sweep: table + plot.")
  flags.DEFINE_integer("batch_size", 250, "Samples per jitted call.")
  flags.DEFINE_integer("seed", 0, "Sampling and dequantisation seed.")
  flags.DEFINE_string("student_workdir", None, "Decode samples with the "
                      "distilled student of this workdir (farmer_jax.distill) "
                      "instead of the exact inverse; same latents and seeds.")
  flags.mark_flags_as_required(["workdir"])


def exact_bpd(run, split: str, seed: int) -> dict:
  """Exact bits/dim of the whole `split` (uniform dequantisation)."""
  eval_fn = jax.jit(functools.partial(evaluation.eval_terms, run.model,
                                      num_dims=train.num_dims(run.config)))
  batches = evaluation.eval_batches(run.config, split, run.batch_sharding, -1)
  with sharding.context(run.mesh, run.config):
    return evaluation.evaluate_bpd(eval_fn, run.variables["params"], batches,
                                   jax.random.PRNGKey(seed))


def sample_quality_at(run, clf, real_features, cfg_scales, num_samples: int,
                      seed: int, batch_size: int, decoder=None) -> list:
  """`evaluation.sample_quality` of `num_samples` samples at each `w`."""
  labels = np.arange(num_samples) % run.config.model.num_classes
  rows = []
  for w in cfg_scales:
    images = inference.generate(run, labels, seed, batch_size=batch_size,
                                denoise=run.config.sample.denoise,
                                decoder=decoder, progress=True,
                                cfg_scale=float(w))
    rows.append(dict(cfg_scale=float(w), **evaluation.sample_quality(
        images, labels, clf, real_features)))
    logging.info("w=%g: %s", w, rows[-1])
  return rows


def write_sweep(rows: list, path_prefix: str) -> None:
  """`rows` as CSV and as a two-panel plot (accuracy, Fréchet vs w)."""
  with open(path_prefix + ".csv", "w") as f:
    f.write("cfg_scale,accuracy,frechet,num_samples\n")
    for r in rows:
      f.write(f"{r['cfg_scale']},{r['accuracy']:.4f},{r['frechet']:.4f},"
              f"{r['num_samples']}\n")
  ws = [r["cfg_scale"] for r in rows]
  # The Figure API needs no pyplot backend (headless, and leaves notebooks'
  # inline backend alone).
  fig = figure.Figure(figsize=(8, 3))
  axes = fig.subplots(1, 2)
  axes[0].plot(ws, [r["accuracy"] for r in rows], "o-")
  axes[0].set(xlabel="cfg scale w", ylabel="sample class accuracy")
  axes[1].plot(ws, [r["frechet"] for r in rows], "o-")
  axes[1].set(xlabel="cfg scale w", ylabel="Fréchet distance (classifier)")
  fig.tight_layout()
  fig.savefig(path_prefix + ".png", dpi=100)


def evaluate(workdir: str, *, step=None, split=None, num_samples=None,
             cfg_scale=None, sweep: bool = False, batch_size: int = 250,
             seed: int = 0, student_workdir=None) -> dict:
  """Everything the CLI reports, as a dict (also written as JSON).

  With `student_workdir`, samples are decoded by the distilled one-step
  student instead of the exact inverse: same seeds, so the same latents,
  and the JSON goes to `eval/<step>_student.json`.
  """
  run = inference.restore(workdir, step)
  decoder = None
  if student_workdir:
    from farmer_jax import distill  # pylint: disable=g-import-not-at-top
    decoder = distill.load_decoder(student_workdir, run)
  config = run.config
  split = split or config.data.eval_split
  result = dict(step=run.step, split=split,
                decoder="student" if decoder else "exact",
                **exact_bpd(run, split, seed))
  suffix = "_student" if decoder else ""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  n = config.sample.num_eval_samples if num_samples is None else num_samples
  if n <= 0:
    result["samples"] = "skipped: num_samples = 0"
  elif config.classifier.steps <= 0 or config.model.num_classes < 2:
    result["samples"] = ("skipped: no classifier for this config "
                         "(classifier.steps = 0 or unconditional); FID with "
                         "Inception-v3 is not implemented here")
  else:
    model, params, info = classifier.load_or_train(config, workdir)
    clf = (model, params)
    real, _ = classifier.real_images(config, split)
    train_real, _ = classifier.real_images(config, config.data.train_split,
                                           limit=len(real))
    real_feats = classifier.features(*clf, real)
    w = config.sample.cfg_scale if cfg_scale is None else cfg_scale
    scales = sorted(set(config.sample.cfg_sweep) | {w}) if sweep else [w]
    rows = sample_quality_at(run, clf, real_feats, scales, n, seed,
                             batch_size, decoder)
    result["samples"] = dict(next(r for r in rows if r["cfg_scale"] == w))
    result["samples"]["classifier_test_accuracy"] = info["test_accuracy"]
    result["samples"]["frechet_real_train_vs_split"] = (
        classifier.frechet_distance(real_feats,
                                    classifier.features(*clf, train_real)))
    if sweep:
      result["cfg_sweep"] = rows
      write_sweep(rows, os.path.join(workdir, "eval",
                                     f"cfg_sweep_{run.step}{suffix}"))
  with open(os.path.join(workdir, "eval", f"{run.step}{suffix}.json"),
            "w") as f:
    json.dump(result, f, indent=2)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = evaluate(FLAGS.workdir, step=FLAGS.step, split=FLAGS.split,
                    num_samples=FLAGS.num_samples, cfg_scale=FLAGS.cfg_scale,
                    sweep=FLAGS.sweep, batch_size=FLAGS.batch_size,
                    seed=FLAGS.seed, student_workdir=FLAGS.student_workdir)
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
