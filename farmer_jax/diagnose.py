r"""Where do bad samples come from? Swap real and sampled latent halves.

  python -m farmer_jax.diagnose --workdir=workdirs/digits [--num_images=200]

On `num_images` test images `x` with labels `c` (EMA parameters), encodes
`z = F(x) = [Z^I | Z^R]` and decodes these hybrids, each scored by the
sample-quality classifier (accuracy for `c`, Fréchet distance to the split):

* `recon`           `F^-1(z)`: the flow alone (should match the real images);
* `real_I+draw_R`   real `Z^I`, `Z^R` drawn from the prior's redundant
                    mixture(s) given the real `Z^I` (temperature 1);
* `real_I+mean_R`   real `Z^I`, `Z^R` at the mean of each token's most likely
                    redundant component;
* `draw_I+real_R`   `Z^I` sampled for class `c` (w = 0), the real image's `Z^R`;
* `draw_I+draw_R`   a full sample for class `c` (w = 0), i.e. `sample`;
* `draw_I+draw_R (denoised)` the same after one Tweedie step.

Also: where the redundant channels hold the image (the real `Z^R`'s std per
channel on background tokens, whose 4x4 pixels are all 0, vs stroke tokens),
the redundant prior's log-density per dimension on each kind of token, and
the test bits/dim split. Writes `<out>/diagnosis.json` and
`<out>/diagnosis.png` (one row per hybrid, the same 16 images in each).
"""
import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import classifier
from farmer_jax import fileio
from farmer_jax import inference
from farmer_jax import metrics
from farmer_jax import nll
from farmer_jax import pretrained
from farmer_jax import sampling
from farmer_jax.models import Farmer
from farmer_jax.models import gmm
from farmer_jax.models import patchify
from farmer_jax.models import flow

FLAGS = flags.FLAGS


def define_flags() -> None:
  pretrained.define_workdir_flags()  # --workdir, --pretrained=digits
  inference.define_restore_flags()  # --mesh=-1,1,1, --matmul_precision
  flags.DEFINE_integer("num_images", 200, "Test images to diagnose.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("out", None, "Output folder (default: "
                      "<workdir>/diagnosis).")


def _top_mean(mix: gmm.Mixture) -> jax.Array:
  """Mean of the most likely component, `[..., d]`."""
  k = jnp.argmax(mix.logits, -1)
  return jnp.take_along_axis(mix.means, k[..., None, None], -2)[..., 0, :]


def _per_token(mix: gmm.Mixture, n: int) -> gmm.Mixture:
  """A shared `[B]` mixture broadcast to `[B, N]` (per-token ones as is)."""
  if mix.logits.ndim == 3:
    return mix
  return jax.tree.map(
      lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], n) + a.shape[1:]),
      mix)


def latent_hybrids(run, images: np.ndarray, labels: np.ndarray,
                   seed: int) -> tuple:
  """uint8 images of each hybrid (module docstring), and latent statistics."""
  model, params = run.model, run.variables
  cfg = model.config
  d_i, n = cfg.d_I, model.num_tokens
  x = nll.to_model_range(jnp.asarray(images))
  lab = jnp.asarray(labels, jnp.int32)
  rng_r, rng_s = jax.random.split(jax.random.PRNGKey(seed))

  @jax.jit
  def encode(x, lab):
    z, _ = model.apply(params, x, lab, method=Farmer.encode)
    _, mix_r = model.apply(params, z, lab, method=lambda m, z, l: m.prior(
        z, l))
    return z, mix_r

  decode = jax.jit(lambda z, lab: jnp.clip(
      model.apply(params, z, lab, method=Farmer.decode), -1, 1))
  sample = jax.jit(functools.partial(sampling.sample_latents, model))
  z, mix_r = encode(x, lab)
  mix_r = _per_token(mix_r, n)
  z_i, z_r = z[..., :d_i], z[..., d_i:]
  draw_r = gmm.sample(rng_r, mix_r)
  mean_r = _top_mean(mix_r)
  z_s = sample(params, rng_s, lab)
  hybrids = {
      "recon": z,
      "real_I+draw_R": jnp.concatenate([z_i, draw_r], -1),
      "real_I+mean_R": jnp.concatenate([z_i, mean_r], -1),
      "draw_I+real_R": jnp.concatenate([z_s[..., :d_i], z_r], -1),
      "draw_I+draw_R": z_s,
  }
  decoded = {k: decode(v, lab) for k, v in hybrids.items()}
  decoded["draw_I+draw_R (denoised)"] = jnp.clip(sampling.tweedie_denoise(
      model, params, decoded["draw_I+draw_R"], lab,
      float(run.config.noise_min)), -1, 1)
  out = {k: metrics.to_host(nll.to_uint8(v)) for k, v in decoded.items()}

  # Background tokens: every pixel of the patch is 0 (black) in the image,
  # in the prior's token order (the flow's terminal permutation).
  patches = np.asarray(_prior_order_patches(run, x))
  background = np.all(patches <= -1.0 + 1e-6, axis=-1)  # [B, N]
  zr = np.asarray(z_r)
  logp_r = np.asarray(gmm.log_prob(z_r, mix_r)) / max(z_r.shape[-1], 1)
  stats = dict(
      background_token_fraction=float(background.mean()),
      zr_std_background=np.round(zr[background].std(0), 3).tolist(),
      zr_std_stroke=np.round(zr[~background].std(0), 3).tolist(),
      zi_std_background=np.round(np.asarray(z_i)[background].std(0),
                                 3).tolist(),
      zi_std_stroke=np.round(np.asarray(z_i)[~background].std(0), 3).tolist(),
      logp_r_per_dim_background=float(logp_r[background].mean()),
      logp_r_per_dim_stroke=float(logp_r[~background].mean()),
      redundant_top_weight=float(jax.nn.softmax(mix_r.logits, -1).max(
          -1).mean()),
  )
  return out, stats


def _prior_order_patches(run, x):
  """Pixel patches `[B, N, d]` in the token order of the prior's `z`."""
  p = patchify(x, run.model.config.patch_size)
  return p[:, ::-1] if flow.terminal_flip(run.model.config) else p


def diagnose(workdir: str, num_images: int = 200, seed: int = 0,
             out: str = None, mesh: str = None,
             matmul_precision: str = None) -> dict:
  """Everything the CLI reports, as a dict (also written as JSON + PNG)."""
  run = inference.restore(workdir, mesh_shape=inference.parse_mesh(mesh),
                          matmul_precision=matmul_precision)
  config = run.config
  out = out or fileio.path(workdir) / "diagnosis"
  images, labels = classifier.real_images(config, config.data.eval_split,
                                          limit=num_images)
  model, params, info = classifier.load_or_train(config, workdir)
  real_feats = classifier.features(model, params, images)
  hybrids, stats = latent_hybrids(run, images, labels, seed)
  rows = {"real": dict(accuracy=float(np.mean(
      classifier.predict(model, params, images) == labels)), frechet=0.0)}
  for name, imgs in hybrids.items():
    q = metrics.sample_quality(imgs, labels, (model, params), real_feats)
    rows[name] = dict(accuracy=q["accuracy"], frechet=q["frechet"])
  result = dict(step=run.step, num_images=int(len(labels)),
                classifier_test_accuracy=info["test_accuracy"],
                hybrids=rows, latents=stats)
  grid = np.concatenate([images[:16]] + [v[:16] for v in hybrids.values()])
  if jax.process_index() == 0:
    write(out, result, metrics.make_grid(grid, ncol=16))
  return result


def write(out, result: dict, grid: np.ndarray) -> None:
  """`<out>/diagnosis.json` and `<out>/diagnosis.png` (local or gs://)."""
  out = fileio.path(out)
  metrics.save_png(grid, out / "diagnosis.png")
  fileio.write_json(out / "diagnosis.json", result)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = pretrained.resolve(FLAGS.workdir, FLAGS.pretrained)
  print(json.dumps(diagnose(workdir, FLAGS.num_images, FLAGS.seed,
                            FLAGS.out, FLAGS.mesh,
                            FLAGS.matmul_precision), indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
