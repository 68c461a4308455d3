"""`train_and_evaluate(config, workdir)`: FARMER training on `loop.run`.

config -> mesh -> abstract state -> sharded init or restore -> jitted step
-> the shared loop (loop.py: logging, non-finite guard, EMA, evaluation,
checkpoints). The step is a pure function `(state, batch) -> (state,
metrics)` jitted once with explicit shardings and the state donated; its
evaluation is exact test bits/dim plus reconstruction and sample grids.
"""
import functools
import math
from typing import Optional

from absl import logging
from clu import parameter_overview
import flax.linen as nn
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
from farmer_jax.models import init_params

# The shared loop's names, here for callers of the training API.
NonFiniteError = loop.NonFiniteError
TrainState = loop.TrainState


def create_optimizer(config):
  """AdamW on `config.lr`, `warmup_steps`, `total_steps`, `lr_end` (loop.py)."""
  return loop.create_optimizer(config, lr=config.lr,
                               warmup_steps=config.warmup_steps,
                               total_steps=config.total_steps,
                               end_lr=config.lr_end)


num_dims = config_lib.num_dims


def init_state(config, model, tx, rng) -> TrainState:
  """The initial state with `LogicallyPartitioned` boxes (for eval_shape)."""
  rng_params, rng_drop, rng_train = jax.random.split(rng, 3)
  params = init_params(model, {"params": rng_params, "dropout": rng_drop})
  return loop.new_state(params, tx, rng_train)


def create_sharded_state(config, model, tx, mesh):
  """Abstract first, born sharded.

  Returns:
    `(init_fn, abstract_state, state_shardings)`: `init_fn()` builds the
    real state directly into its shardings; `abstract_state` (with
    shardings) is the Orbax restore target.
  """
  rng = jax.random.PRNGKey(config.seed)
  init = functools.partial(init_state, config, model, tx)
  abstract, shardings = sharding.abstract_and_shardings(
      functools.partial(init, rng), mesh, config)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_fn(rng):
    return nn.meta.unbox(init(rng))

  return functools.partial(init_fn, rng), abstract, shardings


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
  x = loop.inject_nonfinite(x, state.step + 1, config.debug_nonfinite_steps)
  dims = num_dims(config)
  (loss, out), grads = _loss_and_grads(
      state.params, x, batch["label"], rng_drop, model=model, dims=dims,
      accum=config.grad_accum_steps)
  new_state, update_metrics = loop.apply_gradients(
      state, grads, loss, tx=tx, schedule=schedule,
      ema_decay=config.ema_decay)
  to_bits = 1.0 / (dims * math.log(2.0))
  step_metrics = dict(
      loss=loss, bits_per_dim=loss / math.log(2.0) + metrics.BIN_BITS,
      bpd_flow=-jnp.mean(out["logdet"]) * to_bits,
      bpd_I=-jnp.mean(out["logp_I"]) * to_bits,
      bpd_R=-jnp.mean(out["logp_R"]) * to_bits,
      noise_std=noise, **update_metrics)
  return new_state, step_metrics


class Trainer:
  """FARMER training as a `loop.Task`, built from the config."""

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
        metrics.eval_terms, self.model, num_dims=num_dims(config)))
    self.reconstruct_fn = jax.jit(functools.partial(metrics.reconstruction,
                                                    self.model))

  def task(self) -> loop.Task:
    return loop.Task(mesh=self.mesh, batch_sharding=self.batch_sharding,
                     init_fn=self.init_fn, abstract_state=self.abstract_state,
                     step_fn=self.train_step, evaluate=self.evaluate,
                     total_steps=self.config.total_steps)

  def eval_batches(self):
    return metrics.eval_batches(self.config, self.config.data.eval_split,
                                self.batch_sharding,
                                self.config.num_eval_batches)

  def evaluate(self, state, writer, step: int) -> dict:
    """Exact test bits/dim on EMA params + a reconstruction grid."""
    with sharding.context(self.mesh, self.config):
      result = metrics.evaluate_bpd(
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
    with sharding.context(self.mesh, self.config):
      recon = self.reconstruct_fn(state.ema_params, batch["image"][:n],
                                  batch["label"][:n])["recon"]
    grid = metrics.make_grid(metrics.to_host(nll.to_uint8(recon)))
    if jax.process_index() == 0:
      metrics.save_png(grid, fileio.path(self.workdir) / "images" /
                       f"reconstructions_{step}.png")
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
    grid = metrics.make_grid(images, ncol=min(classes, n))
    if jax.process_index() == 0:
      metrics.save_png(grid, fileio.path(self.workdir) / "images" /
                       f"samples_{step}.png")
    writer.write_images(step, {"samples": grid[None]})


def _log_once(config, trainer: Trainer) -> None:
  logging.info("Derived values: %s",
               config_lib.derived(config, process_count=jax.process_count()))
  logging.info("Mesh: %s", dict(trainer.mesh.shape))
  parameter_overview.log_parameter_overview(trainer.abstract_state.params,
                                             include_stats=False)


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
  return loop.run(config, workdir, trainer.task(), stop_at_step=stop_at_step)
