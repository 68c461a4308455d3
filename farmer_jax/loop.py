"""The one training loop, shared by FARMER training and distillation.

A run supplies a `Task`: its mesh and batch sharding, a fresh-state
function and the abstract (restore-target) state, a jitted step
`(state, batch) -> (state, metrics)` and an evaluation. Everything else is
here and the same for both: resume (checkpoint in workdir -> fresh state),
step scheduling, the non-finite guard (skip the update, abort after
`config.max_consecutive_nonfinite` in a row), EMA, async checkpoints with
the Grain iterator state, metric writers (farmer_jax/writers.py), progress
and throughput, periodic evaluation, preemption. Gathers to the host go
through `metrics.to_host` (every process takes part, so multi-host runs
work).

The state (`TrainState`) and its update (`apply_gradients`: optimizer,
non-finite skip, EMA, common metrics) are shared too; a step function
computes its loss and gradients and hands them to `apply_gradients`.
"""
import dataclasses
import functools
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from farmer_jax import checkpointing
from farmer_jax import config_lib
from farmer_jax import input_pipeline
from farmer_jax import metrics as metrics_lib
from farmer_jax import sharding
from farmer_jax import writers


class NonFiniteError(FloatingPointError):
  """Too many non-finite steps in a row."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  nonfinite_in_a_row: jax.Array  # consecutive skipped updates
  nonfinite_total: jax.Array


# Parameter names that weight decay leaves alone with
# `config.weight_decay_mask`: norm scales, biases (`bias`; the MLP's `bi`,
# `bo`) and embeddings (class, position, learned tokens). Decay pulls them
# towards 0, which regularises nothing there. By name, not by rank: scanned
# layers give biases a leading layer axis.
_NO_DECAY_NAMES = frozenset({"bias", "bi", "bo", "scale", "embedding",
                             "pos_emb", "pos_R", "extra_token"})


def decay_mask(params) -> Any:
  """True for parameters that get weight decay (kernels), False otherwise."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name not in _NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config, *, lr: float, warmup_steps: int,
                     total_steps: int, end_lr: float = 0.0):
  """AdamW, linear warmup + cosine decay, global-norm clipping.

  Args:
    config: holds grad_clip, b1, b2, weight_decay and weight_decay_mask.
    lr: peak learning rate.
    warmup_steps: linear warmup from 0.
    total_steps: the cosine ends (at `end_lr`) here.
    end_lr: the learning rate at `total_steps`.

  Returns:
    `(tx, schedule)`.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=end_lr)
  mask = decay_mask if config.get("weight_decay_mask", False) else None
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(schedule, b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay, mask=mask))
  return tx, schedule


def optimizer_count(opt_state) -> jax.Array:
  """Updates the optimizer has applied (skipped steps do not count)."""
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
  return counts[0][1]


def new_state(params, tx, rng) -> TrainState:
  """Step 0: the optimizer's fresh state, EMA = params."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params),
                    ema_params=params, rng=rng, nonfinite_in_a_row=zero,
                    nonfinite_total=zero)


def inject_nonfinite(x, step, steps: tuple):
  """NaN input at the loop steps in `steps` (config.debug_nonfinite_steps).

  A fault-injection switch for tests of the non-finite handling; with the
  default `()` nothing is traced, so normal runs compile the same program.
  """
  if not steps:
    return x
  return jnp.where(jnp.isin(step, jnp.asarray(steps)), jnp.nan, x)


def apply_gradients(state: TrainState, grads, loss, *, tx, schedule,
                    ema_decay: float):
  """The update every step shares: optimizer, non-finite skip, EMA.

  A non-finite loss or gradient leaves params, optimizer and EMA unchanged
  (the step counter still advances past the batch) and is counted.

  Returns:
    `(new_state, metrics)`, metrics: grad and param norms, the learning
    rate of this update (from the optimizer's own count) and the
    non-finite counters.
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(operands):
    params, opt_state, ema = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, opt_state, ema

  # One branch runs: a finite step touches each parameter once (AdamW + EMA
  # fused), a skipped one leaves everything as it was; no per-leaf selects.
  params, opt_state, ema = jax.lax.cond(
      finite, update, lambda operands: operands,
      (state.params, state.opt_state, state.ema_params))
  new = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  out = dict(grad_norm=grad_norm, param_norm=optax.global_norm(state.params),
             learning_rate=schedule(optimizer_count(state.opt_state)),
             nonfinite_in_a_row=new.nonfinite_in_a_row,
             nonfinite_total=new.nonfinite_total)
  return new, out


@dataclasses.dataclass
class Task:
  """What a run hands the loop; see the module docstring.

  Attributes:
    mesh: the device mesh.
    batch_sharding: the global batch's sharding.
    init_fn: `() -> TrainState`, fresh, born sharded.
    abstract_state: ShapeDtypeStructs with shardings (the restore target).
    step_fn: jitted `(state, batch) -> (state, metrics)`; metrics include
      `loss` and `apply_gradients`' metrics.
    evaluate: `(state, writer, step) -> dict`.
    total_steps: where the schedule ends.
    eval_at_start: evaluate the fresh state at step 0 (distillation: the
      student before training).
    fix_hint: what to change when steps keep failing (error messages).
  """
  mesh: Any
  batch_sharding: Any
  init_fn: Callable[[], TrainState]
  abstract_state: Any
  step_fn: Callable
  evaluate: Callable[[Any, Any, int], dict]
  total_steps: int
  eval_at_start: bool = False
  fix_hint: str = "Lower config.lr, raise config.noise_min or check the data."


def check_finite(step_metrics: dict, step: int, limit: int,
                 fix_hint: str) -> None:
  """NonFiniteError once `limit` steps in a row were skipped."""
  in_a_row = int(step_metrics["nonfinite_in_a_row"])
  if in_a_row >= limit:
    raise NonFiniteError(
        f"{in_a_row} non-finite steps in a row, the last at step {step} "
        f"(loss={float(step_metrics['loss'])}, grad_norm="
        f"{float(step_metrics['grad_norm'])}); no update was applied for "
        f"them. {fix_hint}")


def run(config, workdir: str, task: Task, *,
        stop_at_step: Optional[int] = None) -> dict:
  """Trains `task` (resuming from `workdir`), evaluates, checkpoints.

  Args:
    config: the run's config (cadences, limits, data).
    workdir: checkpoints, `config.json`, events and images go here.
    task: the run's state, step and evaluation.
    stop_at_step: save and return after this step as if preempted; the
      schedule still ends at `task.total_steps`.

  Returns:
    The last evaluation (empty if none ran).
  """
  checkpointer = checkpointing.Checkpointer(workdir, config)
  writer = None
  try:
    data_iter = input_pipeline.create_train_iterator(
        config, process_index=jax.process_index(),
        process_count=jax.process_count())
    step = checkpointer.latest_step()
    if step is not None:
      state, data_iter = checkpointer.restore(step, task.abstract_state,
                                              data_iter)
    else:
      logging.info("No checkpoint in %s: starting from a fresh state.",
                   workdir)
      with sharding.context(task.mesh, config):
        state = task.init_fn()
    # After the restore: a workdir of another model keeps its own config.
    checkpointing.save_config(config, workdir)
    first_step = int(state.step)
    writer = writers.create(workdir, just_logging=jax.process_index() > 0)
    last_eval = {}
    if first_step == 0:
      writer.write_hparams(config_lib.flatten(config))
      if task.eval_at_start:
        last_eval = task.evaluate(state, writer, 0)
    logging.info("Training from step %d to %d.", first_step,
                 stop_at_step or task.total_steps)
    return _steps(config, task, checkpointer, state, data_iter, writer,
                  first_step, stop_at_step or task.total_steps, last_eval)
  finally:
    checkpointer.close()  # waits for async saves: never lose work
    if writer is not None:
      writer.close()


def _log_means(writer, step: int, pending: list, seconds: float,
               batch_size: int) -> None:
  host = metrics_lib.to_host(pending)
  means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  means["steps_per_sec"] = len(pending) / seconds
  means["images_per_sec"] = means["steps_per_sec"] * batch_size
  writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})


def _steps(config, task, checkpointer, state, data_iter, writer, first_step,
           last_step, last_eval) -> dict:
  report = writers.Progress(task.total_steps, writer)
  limit = config.max_consecutive_nonfinite
  check = functools.partial(check_finite, limit=limit,
                            fix_hint=task.fix_hint)
  pending, prev_metrics, t0 = [], None, time.time()
  for step in range(first_step + 1, last_step + 1):
    batch = input_pipeline.make_global_batch(next(data_iter),
                                             task.batch_sharding)
    with sharding.context(task.mesh, config):
      state, step_metrics = task.step_fn(state, batch)
    if prev_metrics is not None:  # one step behind: no sync on this step
      check(metrics_lib.to_host(prev_metrics), step - 1)
    prev_metrics = step_metrics
    pending.append(step_metrics)
    report(step)
    if step % config.log_every == 0 or step == last_step:
      _log_means(writer, step, pending, time.time() - t0, config.batch_size)
      pending, t0 = [], time.time()
    if step % config.eval_every == 0 or step == task.total_steps:
      last_eval = task.evaluate(state, writer, step)
    if checkpointer.should_save(step, last_step):
      checkpointer.save(step, state, data_iter)
      if checkpointer.reached_preemption(step):
        logging.warning("Preemption signalled: saved step %d, exiting.", step)
        break
  if prev_metrics is not None:
    check(metrics_lib.to_host(prev_metrics), int(state.step))
  return last_eval
