"""The real `train_and_evaluate` on 8 fake CPU devices: shard, save, resume."""
import os
import shutil

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp

import helpers
from farmer_jax import checkpointing
from farmer_jax import inference
from farmer_jax import sharding
from farmer_jax import train
from farmer_jax.models import Farmer


def tiny_config(**overrides):
  config = helpers.load_config("digits", "tiny")
  config.update(dict(total_steps=12, ckpt_every=4, log_every=4, eval_every=12,
                     mesh_shape=(2, 4, 1), num_eval_batches=1))
  config.update(overrides)
  return config


def restore_params(config, workdir, step=None):
  """The whole TrainState (params, optimizer, EMA) of `step`."""
  mesh = sharding.create_mesh(config)
  _, abstract, _ = train.create_sharded_state(
      config, Farmer(config.model), train.create_optimizer(config)[0], mesh)
  ckpt = checkpointing.Checkpointer(workdir, config, read_only=True)
  try:
    return ckpt.restore_state(step, abstract)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted run to step 12, and one resumed from step 8.

  The resumed run's workdir is the uninterrupted one as it was at step 8
  (what a run stopped or killed there leaves: the later checkpoint left
  out), so one training run less is needed; `stop_at_step` itself runs in
  distill_test and multiprocess_test.
  """
  config = tiny_config()
  full = str(tmp_path_factory.mktemp("full"))
  sliced = str(tmp_path_factory.mktemp("sliced"))
  result = train.train_and_evaluate(config, full)
  shutil.rmtree(sliced)
  shutil.copytree(full, sliced, ignore=lambda d, names: [
      n for n in names if n.startswith("events.out.")
      or (os.path.basename(d) == "checkpoints" and n == "12")])
  stopped = restore_params(config, sliced)
  # The resumed run gets a relative --workdir, as README's command does.
  cwd = os.getcwd()
  os.chdir(os.path.dirname(sliced))
  try:
    train.train_and_evaluate(config, os.path.basename(sliced))
  finally:
    os.chdir(cwd)
  return config, full, sliced, result, stopped


def test_checkpoints_and_eval_written(runs):
  config, full, _, result, _ = runs
  steps = sorted(int(d) for d in os.listdir(os.path.join(full, "checkpoints"))
                 if d.isdigit())
  assert steps == [4, 8, 12]
  assert os.path.exists(os.path.join(full, "images", "reconstructions_12.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(full))
  # What the bits/dim are is tested against closed forms in
  # reference_test.py; here: the evaluation ran on one eval batch.
  assert result["num_images"] == config.eval_batch_size


def test_resume_continues_from_the_last_saved_step(runs):
  _, _, sliced, _, stopped = runs
  assert int(stopped.step) == 8
  steps = sorted(int(d) for d in os.listdir(os.path.join(sliced, "checkpoints"))
                 if d.isdigit())
  assert steps[-1] == 12
  # It trained steps 9-12 only (log_every=4), not again from step 0.
  assert sorted(helpers.scalars(sliced, "train/loss")) == [12]


def test_resumed_equals_uninterrupted(runs):
  config, full, sliced, _, stopped = runs
  a, b = restore_params(config, full), restore_params(config, sliced)
  assert int(a.step) == int(b.step) == 12
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(a.ema_params), jax.tree.leaves(b.ema_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # ...and training did move the parameters after the resume.
  moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
              zip(jax.tree.leaves(a.params), jax.tree.leaves(stopped.params)))
  assert moved > 0


def test_parameters_are_sharded_as_the_rules_say(runs):
  config, full, _, _, _ = runs
  state = restore_params(config, full)
  wi = state.params["prior"]["transformer"]["layers"]["mlp"]["wi"]
  # Logical ('layers', 'embed', 'mlp') -> (None, 'fsdp', 'tensor').
  assert tuple(wi.sharding.spec) == (None, "fsdp", "tensor")
  assert len(wi.sharding.device_set) == 8
  shard_shape = wi.addressable_shards[0].data.shape
  assert shard_shape == (wi.shape[0], wi.shape[1] // 4, wi.shape[2])


def test_runs_saved_before_the_flow_was_scanned_still_restore(runs,
                                                              tmp_path):
  """A checkpoint whose flow params are `block0..block{n-1}` (one subtree
  per block, unstacked) restores into the stacked layout, equal
  leaf for leaf, onto the caller's mesh."""
  config, full, *_ = runs
  run = inference.restore(full)
  ema = jax.device_get(run.variables["params"])
  blocks = ema["flow"]["blocks"]
  n = config.model.af_blocks
  old = {**ema, "flow": {**{k: v for k, v in ema["flow"].items()
                            if k != "blocks"},
                         **{f"block{t}": jax.tree.map(lambda a, t=t: a[t],
                                                      blocks)
                            for t in range(n)}}}
  workdir = tmp_path / "old_run"
  checkpointing.save_config(config, str(workdir))
  manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
  manager.save(12, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"ema_params": old, "step": 12}),
      config=ocp.args.JsonSave(checkpointing._model_dict(config))))
  manager.wait_until_finished()
  manager.close()
  again = inference.restore(str(workdir))
  got = jax.device_get(again.variables["params"])
  assert jax.tree.structure(got) == jax.tree.structure(ema)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)
