r"""One-step distillation of the AF inverse (spec section 8).

The frozen teacher (a trained FARMER workdir, EMA params) runs its parallel
**forward** path on data, `Z_0 = x, Z_1, ..., Z_n = z` (`flow.path`). The
student `G` (`models/student.py`: the teacher's blocks with bidirectional
attention, initialised from the teacher's `params['flow']`) reads the path
backwards: from the noised latent `Z~_n = Z_n + s * eps` its block `t` maps
`Z_{t+1} -> Z_t` in one parallel pass, so decoding costs `n` passes instead
of `n x N` sequential token steps. The noise scale `s` is
`config.distill.latent_noise` (`latent_noise_dist='fixed'`), or drawn per
batch as `s ~ U[0, latent_noise]` ('uniform', the paper's U[0, 0.3]).
Loss (`config.distill.per_block`):

  True   mean over blocks of MSE(student output of block t, teacher Z_t),
         along the student's own chain (per-block path matching);
  False  end-to-end only, MSE(G(Z~_n), x).

Data `x` are training images dequantised as the teacher saw them at the end
of its training (`nll.augment` at `config.noise_min`). The teacher is
restored params-only (`inference.restore`) onto the run's mesh. The loop is
training's (`loop.run`: non-finite skip and abort, EMA at
`config.distill.ema_decay`, Orbax checkpoints with the Grain iterator,
CLU logging, multi-host gathers); the student's workdir must differ from the
teacher's. Its evaluation and `load_student` use the student's EMA params.

Run (a config with a `distill` section, e.g. configs/digits_distill.py):

  python -m farmer_jax.main --config=configs/digits_distill.py \
      --workdir=workdirs/digits_student

For sampling: `student, params = inference.load_student(config,
student_workdir)`, then `inference.student_decode(student, params, z,
labels)` replaces `Farmer.decode` (`inference.load_decoder` bundles the two
for `farmer_jax.sample --decoder=student`).
"""
import functools
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import config_lib
from farmer_jax import fileio
from farmer_jax import inference
from farmer_jax import loop
from farmer_jax import metrics
from farmer_jax import nll
from farmer_jax import sharding
from farmer_jax.models import Farmer
from farmer_jax.models import patchify
from farmer_jax.models.student import StudentDecoder


# How the student's input-noise scale s is chosen per batch
# (config.distill.latent_noise_dist; 'fixed' where a run's config lacks it).
LATENT_NOISE_DISTS = ("fixed", "uniform")


def is_distill_config(config) -> bool:
  """True for a distillation config (a `distill` section naming a teacher)."""
  return "distill" in config and bool(config.distill.teacher_workdir)


def validate(config, workdir: str) -> None:
  """Checks the `distill` section; messages name the field and the fix."""
  req = config_lib._require  # pylint: disable=protected-access
  req("distill" in config, "The config has no `distill` section; use "
      "configs/digits_distill.py or add config.distill (see that file).")
  d = config.distill
  req(bool(d.teacher_workdir), "config.distill.teacher_workdir is empty; "
      "set it to the trained teacher's --workdir.")
  req(fileio.absolute(workdir) != fileio.absolute(d.teacher_workdir),
      f"--workdir={workdir} is config.distill.teacher_workdir; give the "
      "student its own --workdir so the teacher's checkpoints stay intact.")
  req(d.total_steps >= 1, f"config.distill.total_steps={d.total_steps} must "
      "be >= 1.")
  req(0 <= d.warmup_steps < d.total_steps, f"config.distill.warmup_steps="
      f"{d.warmup_steps} must be in [0, total_steps={d.total_steps}).")
  req(d.lr > 0, f"config.distill.lr={d.lr} must be > 0.")
  req(d.latent_noise >= 0, f"config.distill.latent_noise={d.latent_noise} "
      "must be >= 0.")
  dist = d.get("latent_noise_dist", "fixed")
  req(dist in LATENT_NOISE_DISTS, f"config.distill.latent_noise_dist={dist!r} "
      f"is not one of {LATENT_NOISE_DISTS}; set it to 'fixed' (s = "
      "latent_noise) or 'uniform' (s ~ U[0, latent_noise] per batch).")


def create_optimizer(config):
  """`loop.create_optimizer` with the `distill` section's lr and steps."""
  d = config.distill
  return loop.create_optimizer(config, lr=d.lr, warmup_steps=d.warmup_steps,
                               total_steps=d.total_steps)


# The student at inference time lives in `inference` (no training imports).
create_student = inference.create_student
student_decode = inference.student_decode
load_student = inference.load_student
load_decoder = inference.load_decoder


def teacher_path(model: Farmer, teacher_params, x, labels):
  """The teacher's forward path `[Z_0, ..., Z_n]`, raster order, frozen."""
  tokens = patchify(x, model.config.patch_size)
  path = model.apply({"params": teacher_params}, tokens, labels,
                     method=lambda m, t, l: m.flow.path(t, l))
  return jax.lax.stop_gradient(path)


def latent_noise_scale(rng, latent_noise: float, dist: str) -> jax.Array:
  """The student's input-noise scale `s` of one batch, a scalar.

  Args:
    rng: the batch's key (used by 'uniform' only).
    latent_noise: the fixed `s`, or the upper end of its range.
    dist: 'fixed' (`s = latent_noise`) or 'uniform' (`s ~ U[0,
      latent_noise]`: one draw per batch, as the paper's U[0, 0.3], so the
      student learns to decode latents at every noise level up to it).
  """
  if dist == "fixed":
    return jnp.asarray(latent_noise, jnp.float32)
  if dist == "uniform":
    return jax.random.uniform(rng, (), jnp.float32, 0.0, latent_noise)
  raise ValueError(f"latent_noise_dist={dist!r} is not one of "
                   f"{LATENT_NOISE_DISTS}.")


def distill_loss(student, params, path, labels, rng, latent_noise,
                 per_block: bool):
  """Spec section 8 loss; returns `(loss, [MSE of blocks n-1 .. 0])`.

  `latent_noise` is this batch's `s` (`latent_noise_scale`).
  """
  z_n = path[-1] + latent_noise * jax.random.normal(rng, path[-1].shape)
  outputs = student.apply({"params": params}, z_n, labels,
                          method=StudentDecoder.path)
  mses = [jnp.mean(jnp.square(out - target))
          for out, target in zip(outputs, path[-2::-1])]
  return (sum(mses) / len(mses) if per_block else mses[-1]), mses


def distill_step(state: loop.TrainState, teacher_params, batch, *, model,
                 student, tx, schedule, config):
  """One student update on a batch of training images (pure, jitted once).

  The update is training's (`loop.apply_gradients`): a non-finite loss or
  gradient is skipped and counted, EMA at `config.distill.ema_decay`.
  """
  rng_data, rng_latent = jax.random.split(
      jax.random.fold_in(state.rng, state.step))
  x = nll.augment(rng_data, batch["image"], config.noise_min,
                  config.noise_schedule)
  x = loop.inject_nonfinite(x, state.step + 1, config.debug_nonfinite_steps)
  path = teacher_path(model, teacher_params, x, batch["label"])
  d = config.distill
  # A key of its own (fold_in): drawing s leaves rng_latent's noise as is.
  s = latent_noise_scale(jax.random.fold_in(rng_latent, 1), d.latent_noise,
                         d.get("latent_noise_dist", "fixed"))
  (loss, mses), grads = jax.value_and_grad(distill_loss, argnums=1,
                                           has_aux=True)(
      student, state.params, path, batch["label"], rng_latent, s,
      d.per_block)
  new_state, update_metrics = loop.apply_gradients(
      state, grads, loss, tx=tx, schedule=schedule,
      ema_decay=d.get("ema_decay", 0.0))
  n = len(mses)
  step_metrics = dict(
      loss=loss, recon_rmse_noisy=jnp.sqrt(mses[-1]), latent_noise=s,
      **update_metrics,
      **{f"mse_block{n - 1 - k}": m for k, m in enumerate(mses)})
  return new_state, step_metrics


def _state_fns(student, tx, mesh, config):
  """`(init_fn(flow_params), abstract_state, shardings)`: born sharded."""
  rng = jax.random.PRNGKey(config.seed)
  abstract, shardings = sharding.abstract_and_shardings(
      lambda: loop.new_state(inference.student_init(student, rng), tx, rng), mesh,
      config)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_fn(flow_params):
    # A copy, so donating the student's state never frees teacher buffers.
    return loop.new_state(jax.tree.map(jnp.copy, flow_params), tx, rng)

  return init_fn, abstract, shardings


def load_teacher(config, mesh=None) -> inference.Run:
  """The teacher's EMA params (only) from `config.distill.teacher_workdir`.

  Args:
    config: the distillation config; its `model` section must be the
      teacher's (checked against the checkpoint).
    mesh: restore onto this mesh; default: one from `config.mesh_shape`.

  Returns:
    The teacher as an `inference.Run` (model, `{'params': EMA}`, mesh).
  """
  run = inference.restore(config.distill.teacher_workdir, config=config,
                          mesh=mesh)
  logging.info("Teacher: step %d of %s (EMA params).", run.step,
               config.distill.teacher_workdir)
  return run


class Distiller:
  """Distillation as a `loop.Task`, built from the config."""

  def __init__(self, config, workdir: str):
    validate(config, workdir)
    config_lib.validate(config, num_devices=jax.device_count(),
                        process_count=jax.process_count())
    config_lib.check_workdir(workdir)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.create_mesh(config)
    teacher = load_teacher(config, self.mesh)
    self.model, self.teacher_params = teacher.model, teacher.variables[
        "params"]
    self.batch_sharding = sharding.batch_sharding(self.mesh, config)
    self.student = create_student(config.model)
    self.tx, self.schedule = create_optimizer(config)
    self.init_fn, self.abstract_state, state_shardings = _state_fns(
        self.student, self.tx, self.mesh, config)
    teacher_shardings = jax.tree.map(lambda a: a.sharding,
                                     self.teacher_params)
    step_fn = functools.partial(
        distill_step, model=self.model, student=self.student, tx=self.tx,
        schedule=self.schedule, config=config)
    self.step_fn = jax.jit(
        step_fn,
        in_shardings=(state_shardings, teacher_shardings, self.batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)
    self.recon_fn = jax.jit(functools.partial(
        metrics.reconstruction, self.model,
        decode_fn=functools.partial(student_decode, self.student)))

  def task(self) -> loop.Task:
    return loop.Task(
        mesh=self.mesh, batch_sharding=self.batch_sharding,
        init_fn=lambda: self.init_fn(self.teacher_params["flow"]),
        abstract_state=self.abstract_state,
        step_fn=lambda state, batch: self.step_fn(state, self.teacher_params,
                                                  batch),
        evaluate=self.evaluate, total_steps=self.config.distill.total_steps,
        eval_at_start=True,
        fix_hint="Lower config.distill.lr or check the teacher.")

  def eval_batches(self):
    return metrics.eval_batches(self.config, self.config.data.eval_split,
                                self.batch_sharding,
                                self.config.num_eval_batches)

  def evaluate(self, state, writer, step: int) -> dict:
    """Reconstruction error `G(F(x)) - x` (student EMA) + a PNG grid."""
    sq, mx, masks, grid = [], [], [], None
    with sharding.context(self.mesh, self.config):
      for batch in self.eval_batches():
        out = metrics.to_host(self.recon_fn(
            self.teacher_params, batch["image"], batch["label"],
            decoder_params=state.ema_params))
        if grid is None:
          recon = out["recon"][:self.config.num_grid_images]
          grid = metrics.make_grid(np.asarray(nll.to_uint8(recon)))
        sq.append(out["sq_err"])
        mx.append(out["max_abs"])
        masks.append(metrics.to_host(batch["mask"]) > 0)
    mask = np.concatenate(masks)
    result = dict(recon_rmse=float(np.sqrt(np.concatenate(sq)[mask].mean())),
                  recon_max_abs=float(np.concatenate(mx)[mask].max()),
                  num_images=int(mask.sum()))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    logging.info("student eval step %d: %s", step, result)
    if jax.process_index() == 0:
      metrics.save_png(grid, fileio.path(self.workdir) / "images" / (
          f"student_reconstructions_{step}.png"))
    writer.write_images(step, {"student_reconstructions": grid[None]})
    return result


def distill_and_evaluate(config, workdir: str, *,
                         stop_at_step: Optional[int] = None) -> dict:
  """Distils the teacher's inverse into the student, resuming from `workdir`.

  Args:
    config: a config with a `distill` section (configs/digits_distill.py).
    workdir: the student's checkpoints, events and images.
    stop_at_step: save and return after this step as if preempted.

  Returns:
    The last evaluation (`recon_rmse`, `recon_max_abs`, `num_images`); on a
    fresh start the step-0 evaluation (student = teacher weights) is logged
    as `eval/*` at step 0.
  """
  distiller = Distiller(config, workdir)
  logging.info("Distilling: %s", config.distill)
  return loop.run(config, workdir, distiller.task(),
                  stop_at_step=stop_at_step)
