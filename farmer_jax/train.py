"""`train_and_evaluate(config, workdir)`: the one training loop.

config -> mesh -> abstract state -> sharded init or restore -> jitted step
-> periodic logging, evaluation and checkpoints. The step is a pure
function `(state, batch) -> (state, metrics)` jitted once with explicit
shardings and the state donated.
"""
import functools
import math
import os
import time
from typing import Any, Optional

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from farmer_jax import checkpointing
from farmer_jax import config_lib
from farmer_jax import evaluation
from farmer_jax import inference
from farmer_jax import input_pipeline
from farmer_jax import nll
from farmer_jax import sharding
from farmer_jax.models import Farmer


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


def create_optimizer(config):
  """AdamW, linear warmup + cosine decay, global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps,
      # distill.py's optimizer config has no lr_end: it decays to 0.
      end_value=config.get("lr_end", 0.0))
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(schedule, b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay))
  return tx, schedule


def num_dims(config) -> int:
  return config.model.image_size ** 2 * config.model.channels


def _dummy_inputs(config, batch: int = 1):
  s, c = config.model.image_size, config.model.channels
  return jnp.zeros((batch, s, s, c), jnp.float32), jnp.zeros((batch,), jnp.int32)


def init_state(config, model, tx, rng) -> TrainState:
  """The initial state with `LogicallyPartitioned` boxes (for eval_shape)."""
  rng_params, rng_drop, rng_train = jax.random.split(rng, 3)
  x, labels = _dummy_inputs(config)
  params = model.init({"params": rng_params, "dropout": rng_drop}, x,
                      labels)["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params),
                    ema_params=params, rng=rng_train, nonfinite_in_a_row=zero,
                    nonfinite_total=zero)


def create_sharded_state(config, model, tx, mesh):
  """Abstract first, born sharded.

  Returns:
    `(init_fn, abstract_state, state_shardings)`: `init_fn()` builds the
    real state directly into its shardings; `abstract_state` (with
    shardings) is the Orbax restore target.
  """
  rng = jax.random.PRNGKey(config.seed)
  boxed = jax.eval_shape(functools.partial(init_state, config, model, tx), rng)
  shardings = sharding.tree_shardings(boxed, mesh, config)
  abstract = checkpointing.abstract_with_shardings(nn.meta.unbox(boxed),
                                                   shardings)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_fn(rng):
    return nn.meta.unbox(init_state(config, model, tx, rng))

  return functools.partial(init_fn, rng), abstract, shardings


def _inject_nonfinite(x, step, steps: tuple):
  """NaN input at the loop steps in `steps` (config.debug_nonfinite_steps).

  A fault-injection switch for tests of the non-finite handling; with the
  default `()` nothing is traced, so normal runs compile the same program.
  """
  if not steps:
    return x
  return jnp.where(jnp.isin(step, jnp.asarray(steps)), jnp.nan, x)


def _microbatches(a: jax.Array, accum: int) -> jax.Array:
  """`[B, ...]` -> `[accum, B / accum, ...]`, microbatch k = rows k::accum.

  Strided, not contiguous: each device's rows of the batch-sharded array
  split into `accum` equal parts locally, so every microbatch stays spread
  over all devices and nothing moves between them.
  """
  a = a.reshape(a.shape[0] // accum, accum, *a.shape[1:])
  return jnp.swapaxes(a, 0, 1)


def _loss_and_grads(params, x, labels, rng_drop, *, model, dims: int,
                    accum: int):
  """`((loss, out), grads)` of the mean NLL per dim over the batch.

  With `accum > 1` the batch is cut into `accum` microbatches
  (`_microbatches`) and a `lax.scan` sums their losses and gradients, so
  only one microbatch's activations are alive at a time; equal microbatch
  sizes make the mean of their means the full batch's mean. Microbatch k
  draws label dropout from `fold_in(rng_drop, k)`.
  """
  def loss_fn(params, x, labels, rng):
    out = model.apply({"params": params}, x, labels, train=True,
                      rngs={"dropout": rng})
    return -jnp.mean(out["log_prob"]) / dims, out

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    return grad_fn(params, x, labels, rng_drop)

  def body(carry, xs):
    loss_sum, grad_sum = carry
    x_k, labels_k, k = xs
    (loss, out), grads = grad_fn(params, x_k, labels_k,
                                 jax.random.fold_in(rng_drop, k))
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), out

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss_sum, grad_sum), out = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros),
      (_microbatches(x, accum), _microbatches(labels, accum),
       jnp.arange(accum)))
  grads = jax.tree.map(lambda g: g / accum, grad_sum)
  return (loss_sum / accum, out), grads


def train_step(state: TrainState, batch, *, model, tx, schedule, config):
  """One update on the exact NLL of the noise-augmented batch (spec 1, 5).

  A non-finite loss or gradient leaves params, optimizer and EMA unchanged
  (the step counter still advances past the batch) and is counted. With
  `config.grad_accum_steps > 1` the gradient is accumulated over
  microbatches (`_loss_and_grads`); the update is the same.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  rng_noise, rng_drop = jax.random.split(rng)
  noise = nll.noise_level(state.step, config.total_steps,
                          config.noise_schedule, config.noise_max,
                          config.noise_min)
  x = nll.augment(rng_noise, batch["image"], noise, config.noise_schedule)
  x = _inject_nonfinite(x, state.step + 1, config.debug_nonfinite_steps)
  dims = num_dims(config)
  (loss, out), grads = _loss_and_grads(
      state.params, x, batch["label"], rng_drop, model=model, dims=dims,
      accum=config.grad_accum_steps)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                     state.ema_params, params)
  keep = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema, state.ema_params),
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  to_bits = 1.0 / (dims * math.log(2.0))
  metrics = dict(
      loss=loss, bits_per_dim=loss / math.log(2.0) + evaluation.BIN_BITS,
      bpd_flow=-jnp.mean(out["logdet"]) * to_bits,
      bpd_I=-jnp.mean(out["logp_I"]) * to_bits,
      bpd_R=-jnp.mean(out["logp_R"]) * to_bits,
      grad_norm=grad_norm, param_norm=optax.global_norm(state.params),
      learning_rate=schedule(state.step), noise_std=noise,
      nonfinite_in_a_row=new_state.nonfinite_in_a_row,
      nonfinite_total=new_state.nonfinite_total)
  return new_state, metrics


def reconstruct(model, params, images, labels):
  """decode(encode(x)) of uint8 images, in `[-1, 1]` (the grid's round trip)."""
  x = nll.to_model_range(images)
  z, _ = model.apply({"params": params}, x, labels, method=Farmer.encode)
  return model.apply({"params": params}, z, labels, method=Farmer.decode)


class Trainer:
  """Builds everything `train_and_evaluate` needs from the config."""

  def __init__(self, config, workdir: str):
    config_lib.validate(config, num_devices=jax.device_count(),
                        process_count=jax.process_count())
    config_lib.check_workdir(workdir)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.create_mesh(config)
    self.model = Farmer(config.model)
    self.tx, self.schedule = create_optimizer(config)
    self.init_fn, self.abstract_state, self.state_shardings = (
        create_sharded_state(config, self.model, self.tx, self.mesh))
    self.batch_sharding = sharding.batch_sharding(self.mesh, config)
    step_fn = functools.partial(train_step, model=self.model, tx=self.tx,
                                schedule=self.schedule, config=config)
    self.train_step = jax.jit(
        step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)
    self.eval_fn = jax.jit(functools.partial(
        evaluation.eval_terms, self.model, num_dims=num_dims(config)))
    self.reconstruct_fn = jax.jit(functools.partial(reconstruct, self.model))
    self.checkpointer = checkpointing.Checkpointer(workdir, config)

  def restore_or_init(self, data_iter):
    """Checkpoint in workdir -> scratch. Returns `(state, data_iter)`."""
    step = self.checkpointer.latest_step()
    if step is not None:
      return self.checkpointer.restore(step, self.abstract_state, data_iter)
    logging.info("No checkpoint in %s: starting from scratch.", self.workdir)
    with sharding.context(self.mesh, self.config):
      return self.init_fn(), data_iter

  def eval_batches(self):
    return evaluation.eval_batches(self.config, self.config.data.eval_split,
                                   self.batch_sharding,
                                   self.config.num_eval_batches)

  def evaluate(self, state, writer, step: int) -> dict:
    """Exact test bits/dim on EMA params + a reconstruction grid."""
    with sharding.context(self.mesh, self.config):
      result = evaluation.evaluate_bpd(
          self.eval_fn, state.ema_params, self.eval_batches(),
          jax.random.PRNGKey(self.config.seed + 1))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    logging.info("eval step %d: %s", step, result)
    self.write_grid(state, writer, step)
    return result

  def write_grid(self, state, writer, step: int) -> None:
    """decode(encode(x)) of test images (EMA params) as PNG + TensorBoard."""
    batch = next(iter(self.eval_batches()))
    n = self.config.num_grid_images
    recon = self.reconstruct_fn(state.ema_params, batch["image"][:n],
                                batch["label"][:n])
    grid = evaluation.make_grid(evaluation.to_uint8(recon))
    if jax.process_index() == 0:
      evaluation.save_png(grid, os.path.join(self.workdir, "images",
                                             f"reconstructions_{step}.png"))
    writer.write_images(step, {"reconstructions": grid[None]})
    n = self.config.sample.num_grid_images
    if n:
      self.write_samples(state, writer, step, n)

  def write_samples(self, state, writer, step: int, n: int) -> None:
    """Class-conditional samples (config.sample), one class per column."""
    run = inference.Run(self.config, self.model,
                        {"params": state.ema_params}, step, self.mesh,
                        self.workdir)
    classes = max(self.config.model.num_classes, 1)
    images = inference.generate(run, np.arange(n) % classes,
                                seed=self.config.seed,
                                denoise=self.config.sample.denoise)
    grid = evaluation.make_grid(images, ncol=min(classes, n))
    if jax.process_index() == 0:
      evaluation.save_png(grid, os.path.join(self.workdir, "images",
                                             f"samples_{step}.png"))
    writer.write_images(step, {"samples": grid[None]})


def _check_finite(metrics: dict, step: int, limit: int) -> None:
  if int(metrics["nonfinite_in_a_row"]) >= limit:
    raise NonFiniteError(
        f"{int(metrics['nonfinite_in_a_row'])} non-finite steps in a row, the "
        f"last at step {step} (loss={float(metrics['loss'])}, grad_norm="
        f"{float(metrics['grad_norm'])}); no update was applied for them. "
        "Lower config.lr, raise config.noise_min or check the data.")


def _log_once(config, trainer: Trainer) -> None:
  logging.info("Derived values: %s",
               config_lib.derived(config, process_count=jax.process_count()))
  logging.info("Mesh: %s", dict(trainer.mesh.shape))
  parameter_overview.log_parameter_overview(trainer.abstract_state.params,
                                             include_stats=False)


def _hparams(config) -> dict:
  """The config flattened to scalars, for TensorBoard's hparams tab."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
          for k, v in flat.items()}


def train_and_evaluate(config, workdir: str, *,
                       stop_at_step: Optional[int] = None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates.

  Args:
    config: the experiment config.
    workdir: checkpoints, TensorBoard events and images go here.
    stop_at_step: save and return after this step as if preempted (tests,
      and jobs sliced into shorter runs); the schedule still ends at
      `config.total_steps`.

  Returns:
    The last evaluation result (a dict; empty if no evaluation ran).
  """
  trainer = Trainer(config, workdir)
  _log_once(config, trainer)
  data_iter = input_pipeline.create_train_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count())
  state, data_iter = trainer.restore_or_init(data_iter)
  # After the restore: a workdir of another model keeps its own config.
  inference.save_config(config, workdir)  # for sample / evaluate / score
  first_step = int(state.step)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if first_step == 0:
    writer.write_hparams(_hparams(config))
  logging.info("Training from step %d to %d.", first_step, config.total_steps)
  try:
    last_eval = _loop(config, trainer, state, data_iter, writer, first_step,
                      stop_at_step or config.total_steps)
  finally:
    trainer.checkpointer.close()  # waits for async saves: never lose work
    writer.flush()
  return last_eval


def _loop(config, trainer, state, data_iter, writer, first_step,
          last_step) -> dict:
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                           writer=writer)
  pending, last_eval, prev_metrics = [], {}, None
  t0, images_seen = time.time(), 0
  for step in range(first_step + 1, last_step + 1):
    batch = input_pipeline.make_global_batch(next(data_iter),
                                             trainer.batch_sharding)
    with sharding.context(trainer.mesh, config):
      state, metrics = trainer.train_step(state, batch)
    if prev_metrics is not None:  # one step behind: no sync on this step
      _check_finite(prev_metrics, step - 1, config.max_consecutive_nonfinite)
    prev_metrics = metrics
    pending.append(metrics)
    images_seen += config.batch_size
    report(step)
    if step % config.log_every == 0 or step == config.total_steps:
      means = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
               for k in pending[0]}
      means["images_per_sec"] = images_seen / (time.time() - t0)
      writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
      pending, t0, images_seen = [], time.time(), 0
    if step % config.eval_every == 0 or step == config.total_steps:
      last_eval = trainer.evaluate(state, writer, step)
    if trainer.checkpointer.should_save(step, last_step):
      trainer.checkpointer.save(step, state, data_iter)
      if trainer.checkpointer.reached_preemption(step):
        logging.warning("Preemption signalled: saved step %d, exiting.", step)
        break
  if prev_metrics is not None:
    _check_finite(prev_metrics, int(state.step),
                  config.max_consecutive_nonfinite)
  return last_eval
