r"""One-step distillation of the AF inverse (spec section 8).

The frozen teacher (a trained FARMER workdir, EMA params) runs its parallel
**forward** path on data, `Z_0 = x, Z_1, ..., Z_n = z` (`flow.path`). The
student `G` (`models/student.py`: the teacher's blocks with bidirectional
attention, initialised from the teacher's `params['flow']`) reads the path
backwards: from the noised latent `Z~_n = Z_n + latent_noise * eps` its block
`t` maps `Z_{t+1} -> Z_t` in one parallel pass, so decoding costs `n` passes
instead of `n x N` sequential token steps. Loss (`config.distill.per_block`):

  True   mean over blocks of MSE(student output of block t, teacher Z_t),
         along the student's own chain (per-block path matching);
  False  end-to-end only, MSE(G(Z~_n), x).

Data `x` are training images dequantised as the teacher saw them at the end
of its training (`nll.augment` at `config.noise_min`). Sharding, Orbax
checkpoints with the Grain iterator (resume), and CLU logging are those of
`train.py`; the student's workdir must differ from the teacher's.

Run (a config with a `distill` section, e.g. configs/digits_distill.py):

  python -m farmer_jax.main --config=configs/digits_distill.py \
      --workdir=workdirs/digits_student

For sampling: `student, params = load_student(config, student_workdir)`,
then `student_decode(student, params, z, labels)` replaces `Farmer.decode`
(`load_decoder` bundles the two for `farmer_jax.sample --decoder=student`).
"""
import functools
import math
import os
import time
from typing import Any, Optional

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from farmer_jax import checkpointing
from farmer_jax import config_lib
from farmer_jax import evaluation
from farmer_jax import input_pipeline
from farmer_jax import nll
from farmer_jax import sharding
from farmer_jax import train
from farmer_jax.models import Farmer
from farmer_jax.models import patchify
from farmer_jax.models import unpatchify
from farmer_jax.models.student import StudentDecoder


@flax.struct.dataclass
class DistillState:
  step: jax.Array
  params: Any  # the student's; the tree of the teacher's params['flow']
  opt_state: Any
  rng: jax.Array


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
  req(os.path.abspath(workdir) != os.path.abspath(d.teacher_workdir),
      f"--workdir={workdir} is config.distill.teacher_workdir; give the "
      "student its own --workdir so the teacher's checkpoints stay intact.")
  req(d.total_steps >= 1, f"config.distill.total_steps={d.total_steps} must "
      "be >= 1.")
  req(0 <= d.warmup_steps < d.total_steps, f"config.distill.warmup_steps="
      f"{d.warmup_steps} must be in [0, total_steps={d.total_steps}).")
  req(d.lr > 0, f"config.distill.lr={d.lr} must be > 0.")
  req(d.latent_noise >= 0, f"config.distill.latent_noise={d.latent_noise} "
      "must be >= 0.")


def create_optimizer(config):
  """`train.create_optimizer` with the `distill` section's lr and steps."""
  d = config.distill
  return train.create_optimizer(ml_collections.ConfigDict(dict(
      lr=d.lr, warmup_steps=d.warmup_steps, total_steps=d.total_steps,
      grad_clip=config.grad_clip, b1=config.b1, b2=config.b2,
      weight_decay=config.weight_decay)))


def create_student(model_config) -> StudentDecoder:
  """The student for `config.model` (the teacher's model config)."""
  cfg = ml_collections.FrozenConfigDict(model_config)
  return StudentDecoder(cfg, (cfg.image_size // cfg.patch_size) ** 2,
                        cfg.patch_size ** 2 * cfg.channels)


def student_decode(student: StudentDecoder, student_params, z, labels):
  """One-step decoder: latents -> images, like `Farmer.decode`.

  Args:
    student: from `create_student` / `load_student`.
    student_params: the student's params (no `{'params': ...}` wrapper).
    z: `[B, N, d]` latents in the AR prior's token order.
    labels: `[B]` int (used only if `af_class_cond`).

  Returns:
    `[B, H, W, C]` float32 images in `[-1, 1]` units, not clipped.
  """
  tokens = student.apply({"params": student_params}, z, labels)
  s = student.cfg.image_size
  return unpatchify(tokens, student.cfg.patch_size, s, s)


def teacher_path(model: Farmer, teacher_params, x, labels):
  """The teacher's forward path `[Z_0, ..., Z_n]`, raster order, frozen."""
  tokens = patchify(x, model.config.patch_size)
  path = model.apply({"params": teacher_params}, tokens, labels,
                     method=lambda m, t, l: m.flow.path(t, l))
  return jax.lax.stop_gradient(path)


def distill_loss(student, params, path, labels, rng, latent_noise: float,
                 per_block: bool):
  """Spec section 8 loss; returns `(loss, [MSE of blocks n-1 .. 0])`."""
  z_n = path[-1] + latent_noise * jax.random.normal(rng, path[-1].shape)
  outputs = student.apply({"params": params}, z_n, labels,
                          method=StudentDecoder.path)
  mses = [jnp.mean(jnp.square(out - target))
          for out, target in zip(outputs, path[-2::-1])]
  return (sum(mses) / len(mses) if per_block else mses[-1]), mses


def distill_step(state: DistillState, teacher_params, batch, *, model,
                 student, tx, schedule, config):
  """One student update on a batch of training images (pure, jitted once)."""
  rng_data, rng_latent = jax.random.split(
      jax.random.fold_in(state.rng, state.step))
  x = nll.augment(rng_data, batch["image"], config.noise_min,
                  config.noise_schedule)
  path = teacher_path(model, teacher_params, x, batch["label"])
  d = config.distill
  (loss, mses), grads = jax.value_and_grad(distill_loss, argnums=1,
                                           has_aux=True)(
      student, state.params, path, batch["label"], rng_latent,
      d.latent_noise, d.per_block)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  n = len(mses)
  metrics = dict(loss=loss, recon_rmse_noisy=jnp.sqrt(mses[-1]),
                 grad_norm=optax.global_norm(grads),
                 param_norm=optax.global_norm(state.params),
                 learning_rate=schedule(state.step),
                 **{f"mse_block{n - 1 - k}": m for k, m in enumerate(mses)})
  return new_state, metrics


def reconstruct(model, student, teacher_params, student_params, batch):
  """`G(F(x))` of clean test images and per-image errors, `[-1, 1]` units.

  Returns:
    dict: `recon [B, H, W, C]`, `sq_err [B]` (`‖G(F(x)) - x‖^2 / D`) and
    `max_abs [B]`.
  """
  x = nll.to_model_range(batch["image"])
  z, _ = model.apply({"params": teacher_params}, x, batch["label"],
                     method=Farmer.encode)
  recon = student_decode(student, student_params, z, batch["label"])
  err = (recon - x).reshape(x.shape[0], -1)
  return dict(recon=recon, sq_err=jnp.mean(jnp.square(err), -1),
              max_abs=jnp.max(jnp.abs(err), -1))


def _state_fns(student, tx, mesh, config):
  """`(init_fn(flow_params), abstract_state, shardings)`: born sharded."""
  rng = jax.random.PRNGKey(config.seed)
  n, d = student.num_tokens, student.token_dim

  def boxed_state(rng):
    z, labels = jnp.zeros((1, n, d)), jnp.zeros((1,), jnp.int32)
    params = student.init({"params": rng}, z, labels)["params"]
    zero = jnp.zeros((), jnp.int32)
    return DistillState(zero, params, tx.init(params), rng)

  boxed = jax.eval_shape(boxed_state, rng)
  shardings = sharding.tree_shardings(boxed, mesh, config)
  abstract = checkpointing.abstract_with_shardings(nn.meta.unbox(boxed),
                                                   shardings)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_fn(flow_params):
    # A copy, so donating the student's state never frees teacher buffers.
    params = jax.tree.map(jnp.copy, flow_params)
    return DistillState(jnp.zeros((), jnp.int32), params, tx.init(params),
                        rng)

  return init_fn, abstract, shardings


def load_teacher(config):
  """Restores the teacher's EMA params from `config.distill.teacher_workdir`.

  Returns:
    `(trainer, ema_params)`; `trainer` (a `train.Trainer` on the teacher's
    workdir) holds the mesh, the model and the params' shardings.
  """
  trainer = train.Trainer(config, config.distill.teacher_workdir)
  try:
    state = trainer.checkpointer.restore_state(None, trainer.abstract_state)
  finally:
    trainer.checkpointer.close()
  logging.info("Teacher: step %d of %s (EMA params).", int(state.step),
               config.distill.teacher_workdir)
  return trainer, state.ema_params


def load_student(config, workdir: str, step: Optional[int] = None):
  """The trained student of `workdir`, for sampling and evaluation.

  Args:
    config: a config with the teacher's `model` section (the distillation
      config, or the teacher's own: the optimizer values only shape the
      restore target, so any `distill` section will do).
    workdir: the student's workdir (`--workdir` of the distillation run).
    step: checkpoint step; the latest if None.

  Returns:
    `(student, params)` for `student_decode(student, params, z, labels)`.
  """
  if "distill" not in config:
    config = ml_collections.ConfigDict(config.to_dict())
    config.distill = ml_collections.ConfigDict(dict(
        teacher_workdir="", total_steps=1, warmup_steps=0, lr=1.0,
        latent_noise=0.0, per_block=True))
  student = create_student(config.model)
  mesh = sharding.create_mesh(config)
  _, abstract, _ = _state_fns(student, create_optimizer(config)[0], mesh,
                              config)
  ckpt = checkpointing.Checkpointer(workdir, config)
  try:
    state = ckpt.restore_state(step, abstract)
  finally:
    ckpt.close()
  return student, state.params


def load_decoder(workdir: str, run):
  """The student as `farmer_jax.sample --decoder=student` uses it.

  Args:
    workdir: the student's workdir.
    run: anything with the teacher's `config` (e.g. `inference.Run`).

  Returns:
    `(decode_fn, params)`, `decode_fn(params, z, labels) -> x` as
    `student_decode`.
  """
  student, params = load_student(run.config, workdir)
  return functools.partial(student_decode, student), params


class Distiller:
  """Everything `distill_and_evaluate` needs, built from the config."""

  def __init__(self, config, workdir: str):
    validate(config, workdir)
    self.config, self.workdir = config, workdir
    teacher, self.teacher_params = load_teacher(config)
    self.mesh, self.model = teacher.mesh, teacher.model
    self.batch_sharding = teacher.batch_sharding
    self.eval_batches = teacher.eval_batches
    self.student = create_student(config.model)
    self.tx, self.schedule = create_optimizer(config)
    self.init_fn, self.abstract_state, state_shardings = _state_fns(
        self.student, self.tx, self.mesh, config)
    teacher_shardings = teacher.state_shardings.ema_params
    step_fn = functools.partial(
        distill_step, model=self.model, student=self.student, tx=self.tx,
        schedule=self.schedule, config=config)
    self.step_fn = jax.jit(
        step_fn,
        in_shardings=(state_shardings, teacher_shardings, self.batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)
    self.recon_fn = jax.jit(functools.partial(reconstruct, self.model,
                                              self.student))
    self.checkpointer = checkpointing.Checkpointer(workdir, config)

  def restore_or_init(self, data_iter):
    """Checkpoint in workdir -> the teacher's flow weights."""
    step = self.checkpointer.latest_step()
    if step is not None:
      return self.checkpointer.restore(step, self.abstract_state, data_iter)
    logging.info("No checkpoint in %s: student = teacher's flow weights.",
                 self.workdir)
    with sharding.context(self.mesh, self.config):
      return self.init_fn(self.teacher_params["flow"]), data_iter

  def evaluate(self, state, writer, step: int) -> dict:
    """Reconstruction error `G(F(x)) - x` on the test split + a PNG grid."""
    sq, mx, masks, grid = [], [], [], None
    with sharding.context(self.mesh, self.config):
      for batch in self.eval_batches():
        out = self.recon_fn(self.teacher_params, state.params, batch)
        if grid is None:
          grid = evaluation.make_grid(evaluation.to_uint8(
              out["recon"][:self.config.num_grid_images]))
        sq.append(np.asarray(jax.device_get(out["sq_err"])))
        mx.append(np.asarray(jax.device_get(out["max_abs"])))
        masks.append(np.asarray(jax.device_get(batch["mask"])) > 0)
    mask = np.concatenate(masks)
    result = dict(recon_rmse=float(np.sqrt(np.concatenate(sq)[mask].mean())),
                  recon_max_abs=float(np.concatenate(mx)[mask].max()),
                  num_images=int(mask.sum()))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    logging.info("student eval step %d: %s", step, result)
    if jax.process_index() == 0:
      evaluation.save_png(grid, os.path.join(
          self.workdir, "images", f"student_reconstructions_{step}.png"))
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
  data_iter = input_pipeline.create_train_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count())
  state, data_iter = distiller.restore_or_init(data_iter)
  first_step = int(state.step)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  last_eval = {}
  try:
    if first_step == 0:
      writer.write_hparams(config_lib.flatten(config))
      last_eval = distiller.evaluate(state, writer, 0)
    last_eval = _loop(config, distiller, state, data_iter, writer,
                      first_step, stop_at_step or config.distill.total_steps,
                      last_eval)
  finally:
    distiller.checkpointer.close()
    writer.flush()
  return last_eval


def _loop(config, distiller, state, data_iter, writer, first_step, last_step,
          last_eval) -> dict:
  total = config.distill.total_steps
  report = periodic_actions.ReportProgress(num_train_steps=total,
                                           writer=writer)
  pending, t0 = [], time.time()
  for step in range(first_step + 1, last_step + 1):
    batch = input_pipeline.make_global_batch(next(data_iter),
                                             distiller.batch_sharding)
    with sharding.context(distiller.mesh, config):
      state, metrics = distiller.step_fn(state, distiller.teacher_params,
                                         batch)
    pending.append(metrics)
    report(step)
    if step % config.log_every == 0 or step == last_step:
      means = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
               for k in pending[0]}
      if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"Non-finite distillation metrics by step "
                                 f"{step}: {means}. Lower config.distill.lr.")
      means["steps_per_sec"] = len(pending) / (time.time() - t0)
      means["images_per_sec"] = means["steps_per_sec"] * config.batch_size
      writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
      pending, t0 = [], time.time()
    if step % config.eval_every == 0 or step == total:
      last_eval = distiller.evaluate(state, writer, step)
    if distiller.checkpointer.should_save(step, last_step):
      distiller.checkpointer.save(step, state, data_iter)
      if distiller.checkpointer.reached_preemption(step):
        logging.warning("Preemption signalled: saved step %d, exiting.", step)
        break
  return last_eval
