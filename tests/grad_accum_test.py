"""Gradient accumulation (`config.grad_accum_steps`) inside the jitted step.

Accumulating over microbatches must give the full batch's loss and
gradient (the mean of equal-sized microbatch means is the batch mean), and
one sharded `train_step` with accumulation must land on the same parameters
as one without. Label dropout is off so both see the same labels.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from farmer_jax import sharding
from farmer_jax import train


def _config(accum: int):
  config = helpers.load_config("digits", "tiny")
  config.model.label_drop = 0.0
  config.update(grad_accum_steps=accum, mesh_shape=(2, 4, 1))
  return config


def _batch(config, seed: int = 0):
  s, c = config.model.image_size, config.model.channels
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (config.batch_size, s, s, c),
                                dtype=np.uint8),
          "label": rng.integers(0, 10, (config.batch_size,), dtype=np.int32)}


def test_microbatches_are_strided_rows():
  a = jnp.arange(12)
  np.testing.assert_array_equal(train._microbatches(a, 3),  # pylint: disable=protected-access
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


@pytest.mark.parametrize("accum", [4])
def test_accumulated_grads_equal_full_batch(accum):
  config = _config(1)
  model = train.Farmer(config.model)
  batch = _batch(config)
  x = batch["image"].astype(np.float32) / 127.5 - 1.0
  params = helpers.init_random(model, x[:1], batch["label"][:1])["params"]
  fn = jax.jit(functools.partial(
      train._loss_and_grads, model=model, dims=train.num_dims(config)),  # pylint: disable=protected-access
      static_argnames="accum")
  rng = jax.random.PRNGKey(3)
  (loss_1, out_1), grads_1 = fn(params, x, batch["label"], rng, accum=1)
  (loss_k, out_k), grads_k = fn(params, x, batch["label"], rng, accum=accum)
  np.testing.assert_allclose(loss_k, loss_1, rtol=1e-5)
  # Per-image terms come back as [accum, B / accum]; rows k::accum.
  np.testing.assert_allclose(
      np.asarray(out_k["log_prob"]).T.reshape(-1), out_1["log_prob"],
      rtol=1e-5)
  norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads_1))))
  assert norm > 1e-3  # a real gradient, not zeros.
  for g_k, g_1 in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_1)):
    # float32 sums in another order: ~1e-6 of the gradient's scale.
    np.testing.assert_allclose(g_k, g_1, rtol=1e-4, atol=1e-6 * norm)


def _one_step(config, batch):
  mesh = sharding.create_mesh(config)
  model = train.Farmer(config.model)
  tx, schedule = train.create_optimizer(config)
  init_fn, _, shardings = train.create_sharded_state(config, model, tx, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   schedule=schedule, config=config),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  with sharding.context(mesh, config):
    state = init_fn()
    # Two steps, so the second update's gradient reaches every parameter.
    for _ in range(2):
      state, metrics = step(state, jax.device_put(batch, batch_sharding))
  return jax.device_get(state.params), jax.device_get(metrics)


def test_sharded_step_with_accumulation_matches_without():
  batch = _batch(_config(1), seed=1)
  params_1, metrics_1 = _one_step(_config(1), batch)
  params_2, metrics_2 = _one_step(_config(2), batch)
  np.testing.assert_allclose(metrics_2["loss"], metrics_1["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_2["grad_norm"], metrics_1["grad_norm"],
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params_2), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
