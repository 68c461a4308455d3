r"""Samples a trained run: a PNG grid and an `.npz` of uint8 images + labels.

  python -m farmer_jax.sample --workdir=workdirs/digits --num_samples=64 \
      --labels=0,1,2,3,4,5,6,7,8,9 --cfg_scale=1.0 --num_candidates=16 \
      --seed=0 --out=workdirs/digits/samples/grid.png

Restores the latest checkpoint's EMA parameters (or `--step`). Every
sampling option (`sampling.SamplingOptions`: `--cfg_scale`, `--guidance`,
`--proposal`, `--num_candidates`, `--num_uncond_candidates`, the
temperatures `--logit_temp`, `--scale_temp`, `--weigh_logit_temp`,
`--weigh_scale_temp`, `--resample_temp`, and `--r_num_candidates`,
`--r_num_uncond_candidates`, `--r_var_scale` for z^R) has a flag; those
left unset come from the run's `config.sample` (spec 6-7). `--labels`
cycles over the samples (default: all classes in turn). Writes `OUT` (PNG
grid) and `OUT` with `.npz` (arrays `images` uint8 `[B, H, W, C]`, `labels`
`[B]`), and prints how many guided latent dimensions fell back to `p_c`
('rejection' with no accepted try, 'closed_form' on an improper target).

`--decoder` picks the flow inverse (default `config.sample.decoder`):
'exact' (sequential over tokens), 'jacobi' (block-wise Jacobi,
models/jacobi.py; `--jacobi_chunk`, `--jacobi_tol`, `--jacobi_max_iters`,
`--jacobi_block_chunks=0:1`, `--jacobi_block_max_iters` override
`config.sample`; the mean Jacobi iterations per chunk of each flow block are
logged and printed) or 'student' (`--student_workdir`, default
`<workdir>/distill`).
"""
from absl import app
from absl import flags
from absl import logging
import numpy as np

from farmer_jax import decoders
from farmer_jax import fileio
from farmer_jax import inference
from farmer_jax import metrics
from farmer_jax import pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The flags of this CLI (defined only when run as a program)."""
  pretrained.define_workdir_flags()  # --workdir, --pretrained=digits
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  inference.define_restore_flags()  # --mesh=-1,1,1, --matmul_precision
  flags.DEFINE_integer("num_samples", 64, "Number of images.")
  flags.DEFINE_list("labels", None, "Classes, cycled over the samples "
                    "(default: 0..num_classes-1 in turn).")
  inference.define_sampling_flags()  # --cfg_scale, --num_candidates, ...
  flags.DEFINE_bool("denoise", None, "One Tweedie step (spec 6.3).")
  # --decoder=exact|jacobi|student, --student_workdir, --jacobi_chunk, ...
  decoders.define_flags()
  flags.DEFINE_integer("batch_size", 0, "Images per jitted call (0: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("out", None, "PNG path (default: "
                      "<workdir>/samples/samples_<step>_w<cfg>.png).")


def sample_labels(labels, num_classes: int, num_samples: int):
  """`num_samples` labels cycling over `labels` (or over every class)."""
  classes = ([int(l) for l in labels] if labels else
             list(range(max(num_classes, 1))))
  bad = [c for c in classes if num_classes and not 0 <= c < num_classes]
  if bad:
    raise app.UsageError(f"--labels {bad} are not classes of this run "
                         f"(0..{num_classes - 1}).")
  return np.resize(np.asarray(classes, np.int32), num_samples)


def save(images: np.ndarray, labels: np.ndarray, out, ncol: int):
  """The PNG grid at `out` and the arrays at `out` with `.npz` (local or
  gs://); returns both paths."""
  out = fileio.path(out)
  npz = out.with_suffix(".npz")
  metrics.save_png(metrics.make_grid(images, ncol=ncol), out)
  fileio.save_npz(npz, compressed=True, images=images, labels=labels)
  return out, npz


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = pretrained.resolve(FLAGS.workdir, FLAGS.pretrained)
  run = inference.restore(workdir, FLAGS.step,
                          mesh_shape=inference.parse_mesh(FLAGS.mesh),
                          matmul_precision=FLAGS.matmul_precision)
  labels = sample_labels(FLAGS.labels, run.config.model.num_classes,
                         FLAGS.num_samples)
  overrides = inference.sampling_flags()
  denoise = (run.config.sample.denoise if FLAGS.denoise is None
             else FLAGS.denoise)
  # None (exact) or (decode_fn, variables): decode_fn(variables, z, labels).
  decoder = decoders.make_decoder(
      run, FLAGS.decoder, student_workdir=FLAGS.student_workdir,
      **decoders.jacobi_flags())
  stats = {}
  images = inference.generate(run, labels, FLAGS.seed,
                              batch_size=FLAGS.batch_size, decoder=decoder,
                              denoise=denoise, progress=True, stats=stats,
                              **overrides)
  w = overrides.get("cfg_scale", run.config.sample.cfg_scale)
  out = FLAGS.out or fileio.path(workdir) / "samples" / (
      f"samples_{run.step}_w{w:g}.png")
  ncol = min(len(FLAGS.labels or range(max(run.config.model.num_classes, 1))),
             len(images))
  out, npz = save(images, labels, out, ncol)
  logging.info("Wrote %s and %s", out, npz)
  print(f"{out}\n{npz}")
  print(f"guidance fallbacks: {stats['guidance_fallbacks']} latent "
        f"dimension(s) ({stats['guidance_fallback_fraction']:.2%}) fell back "
        "to p_c")
  if "jacobi_iterations_per_chunk" in stats:
    print("Jacobi iterations per chunk by flow block (block 0 nearest the "
          f"data): mean {stats['jacobi_iterations_per_chunk']}, max "
          f"{stats['jacobi_max_iterations_per_chunk']} (chunks "
          f"{stats['jacobi_chunks']}, limits {stats['jacobi_max_iters']})")


if __name__ == "__main__":
  define_flags()
  app.run(main)
