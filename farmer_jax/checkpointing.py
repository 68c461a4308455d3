"""Every Orbax call lives here: train state + Grain iterator, async, resumable.

A checkpoint step holds three items:
  * `state`: the TrainState (params, optimizer, EMA, step, RNG), sharded;
  * `data_iter`: the Grain iterator state (one JSON file per process);
  * `config`: the model config as JSON, checked on restore so a workdir
    written by another architecture fails with a message naming the
    difference instead of a shape error (and the checkpoint is untouched).
Inference reads only the EMA parameters of a step (`restore_params`, an
Orbax partial restore): no optimizer state is built or read. The run's
whole config is `<workdir>/config.json` (`save_config` / `load_config`).
Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save never leaves a step that `latest_step` sees;
the next run deletes such leftovers. A save that fails (disk full, no
permission) raises `CheckpointSaveError`, and the steps already complete
stay as they were.
"""
import json
import re
from typing import Optional

from absl import logging
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from farmer_jax import config_lib
from farmer_jax import fileio
from farmer_jax.models import flow

CONFIG_FILE = "config.json"

# Orbax writes a replicated array "replica-parallel": each replica transfers
# and writes a slice. Every slice is an eager JAX op compiled per shape, which
# for a state of ~150 small arrays cost 9 s of blocking save time on CPU (more
# than training the tests' tiny model). Only slices of at least this size are
# worth it; smaller arrays are written whole by one replica.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler with `MIN_REPLICA_SLICE_BYTES` for jax.Arrays."""
  array = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  scalar = ocp.type_handlers.ScalarHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, array), (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (int, scalar), (float, scalar), (np.number, scalar))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract_state) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written by a different model config."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed; the complete ones are untouched."""


def _model_dict(config) -> dict:
  return json.loads(json.dumps(config.model.to_dict()))


class Checkpointer:
  """Saves/restores the train state and data iterator under `workdir`."""

  def __init__(self, workdir: str, config, *, read_only: bool = False):
    self._config = config
    self._manager = ocp.CheckpointManager(
        # Orbax's TensorStore writer needs an absolute local path.
        fileio.path(fileio.absolute(workdir)) / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else config.keep_ckpts,
            enable_async_checkpointing=not read_only,
            create=not read_only,
            read_only=read_only,
            # Leftovers of a killed save; a reader leaves a live run's alone.
            cleanup_tmp_directories=not read_only,
        ),
        item_handlers={
            "state": _state_handler(),
            "data_iter": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )
    self._save_failed = False

  def latest_step(self):
    return self._manager.latest_step()

  def should_save(self, step: int, last_step: int) -> bool:
    """Every `ckpt_every` steps, at the end, and when preemption is signalled."""
    return (step % self._config.ckpt_every == 0 or step == last_step
            or self._manager.reached_preemption(step))

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, data_iter) -> None:
    """Starts an async save of `state` and the iterator at `step`.

    Raises:
      CheckpointSaveError: this save, or the previous one still finishing
        in the background, could not be written.
    """
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data_iter=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(_model_dict(self._config)),
      ), force=True)
    except Exception as e:  # Orbax and TensorStore raise many types.
      raise self._save_error(f"step {step}", e) from e

  def _save_error(self, what: str, error: Exception) -> CheckpointSaveError:
    self._save_failed = True
    try:
      steps = sorted(int(p.name) for p in self._manager.directory.iterdir()
                     if p.name.isdigit())
      complete = f"step {steps[-1]}" if steps else "none"
    except Exception:  # pylint: disable=broad-except  # unreadable directory.
      complete = "unknown (the directory cannot be listed)"
    return CheckpointSaveError(
        f"Saving the checkpoint of {what} to {self._manager.directory} failed "
        f"({type(error).__name__}: {error}). Complete checkpoints there are "
        f"untouched (the latest: {complete}). Free disk space or fix the "
        "directory's permissions, then rerun the same command to resume.")

  def check_config(self, step: int) -> None:
    """Raises CheckpointMismatchError if the saved model config differs
    (`config_lib.RUNTIME_MODEL_KEYS` may)."""
    saved = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    saved = {**config_lib.ADDED_KEYS["model"], **saved}
    current = _model_dict(self._config)
    diffs = [f"model.{k}: checkpoint has {saved.get(k)!r}, config has "
             f"{current.get(k)!r}"
             for k in sorted(set(saved) | set(current))
             if saved.get(k) != current.get(k)
             and k not in config_lib.RUNTIME_MODEL_KEYS]
    if diffs:
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {self._manager.directory} was "
          "written by a different model config: " + "; ".join(diffs) +
          ". Use a new --workdir, or set these config values back.")

  def restore(self, step: int, abstract_state, data_iter):
    """Restores onto `abstract_state` (ShapeDtypeStructs with shardings).

    Returns:
      `(state, data_iter)`, the iterator positioned where the save left it.
    """
    self.check_config(step)
    logging.info("Restoring checkpoint step %d from %s", step,
                 self._manager.directory)
    iter_dir = self._manager.directory / str(step) / "data_iter"
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not (iter_dir / own).exists():  # saved by another number of hosts
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=_restore_args(abstract_state)))["state"]
      return state, _position_iterator(iter_dir, data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter),
    ))
    return restored["state"], restored["data_iter"]

  def _saved_paths(self, step: int) -> Optional[list]:
    """Key paths of the saved state's leaves (from Orbax's `_METADATA`);
    None if the step has no such file."""
    meta = self._manager.directory / str(step) / "state" / "_METADATA"
    if not meta.exists():
      return None
    tree = json.loads(meta.read_text()).get("tree_metadata", {})
    return [[k["key"] for k in entry["key_metadata"]]
            for entry in tree.values() if entry.get("key_metadata")]

  def has_field(self, step: Optional[int], key: str) -> bool:
    """Whether the saved state of `step` (latest if None) has field `key`."""
    step = self.latest_step() if step is None else step
    paths = self._saved_paths(step)
    if paths is None:
      return True  # let the restore say what is missing
    return any(path[0] == key for path in paths)

  def restore_state(self, step: Optional[int], abstract_state):
    """The whole train state of `step` (latest if None), no iterator."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {self._manager.directory}; train first.")
    self.check_config(step)
    return self._manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(abstract_state)))["state"]

  def restore_params(self, step: Optional[int], abstract_params,
                     key: str = "ema_params"):
    """`state[key]` alone (an Orbax partial restore), latest step if None.

    Args:
      step: checkpoint step; None = the latest.
      abstract_params: ShapeDtypeStructs with shardings: the target tree.
      key: the state field to read (`ema_params`, or `params`).

    Returns:
      `(params, step)`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"No checkpoint in {self._manager.directory}; train first.")
    self.check_config(step)
    per_block = self._per_block_parents(step, key)
    target = abstract_params
    for path, count in per_block.items():
      target = _at(target, path, lambda node, n=count: _unstacked(node, n))
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={key: target}, restore_args={key: restore_args},
            partial_restore=True)))["state"][key]
    for path in per_block:  # flow blocks saved one subtree per block
      restored = _at(restored, path, flow.stack_blocks)
    if per_block:
      restored = jax.tree.map(lambda a, t: jax.device_put(a, t.sharding),
                              restored, abstract_params)
    return restored, step

  def _per_block_parents(self, step: int, key: str) -> dict:
    """`{path: n}` of subtrees of `state[key]` saved as `block0..block{n-1}`
    (unstacked flow blocks); empty for stacked ones."""
    blocks = {}
    for keys in self._saved_paths(step) or []:
      if keys[0] != key:
        continue
      for i, name in enumerate(keys[1:], start=1):
        if re.fullmatch(r"block\d+", name):
          blocks.setdefault(tuple(keys[1:i]), set()).add(name)
          break
    return {path: len(names) for path, names in blocks.items()}

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last async save; CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if self._save_failed:  # that error is already on its way up.
        logging.error("Closing the checkpointer after a failed save: %s", e)
        return
      raise self._save_error("the last step", e) from e


def save_params(workdir: str, step: int, params, config,
                key: str = "ema_params") -> None:
  """Writes a checkpoint step holding only `state[key] = params`.

  What `restore_params` reads, and nothing else (no optimizer, no data
  iterator): the layout of a pretrained run (farmer_jax/pretrained.py).
  Synchronous; the model config is saved beside it as in `Checkpointer`.
  """
  manager = ocp.CheckpointManager(
      fileio.path(fileio.absolute(workdir)) / "checkpoints",
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
      item_handlers={"state": _state_handler(),
                     "config": ocp.JsonCheckpointHandler()})
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({key: params}),
        config=ocp.args.JsonSave(_model_dict(config))), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def _at(tree: dict, path: tuple, fn) -> dict:
  """`tree` with the subtree at `path` (dict keys) replaced by `fn(subtree)`."""
  if not path:
    return fn(tree)
  return {**tree, path[0]: _at(tree[path[0]], path[1:], fn)}


def _unstacked(node: dict, n: int) -> dict:
  """Abstract `{'blocks': stacked, ...}` -> `{'block0': ..., ...}` (n blocks)."""
  def one(a):
    spec = jax.sharding.PartitionSpec(*tuple(a.sharding.spec)[1:])
    return jax.ShapeDtypeStruct(
        a.shape[1:], a.dtype,
        sharding=jax.sharding.NamedSharding(a.sharding.mesh, spec))
  rest = {k: v for k, v in node.items() if k != "blocks"}
  return {**rest, **{f"block{t}": jax.tree.map(one, node["blocks"])
                     for t in range(n)}}


def _position_iterator(iter_dir, data_iter):
  """`data_iter` at the position process 0 of another host count saved.

  The global batches do not depend on the number of hosts (input_pipeline:
  host i reads row block i of every global batch), so every host of any
  host count has read the same number of its own batches: process 0's saved
  position is every host's. Needs the same `config.data.worker_count`
  (Grain's iterator state has one entry per worker).
  """
  saved = sorted(iter_dir.glob("process_0-of-*.json"))
  if not saved:
    raise FileNotFoundError(f"No data iterator state in {iter_dir}.")
  logging.warning("The checkpoint was written by another number of "
                  "processes (%s); this run has %d: positioning the data "
                  "iterator from process 0's state.", saved[0].name,
                  jax.process_count())
  data_iter.set_state(json.loads(saved[0].read_text()))
  return data_iter


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as `<workdir>/config.json` (process 0 only)."""
  if jax.process_index() != 0:
    return
  fileio.write_text(fileio.path(workdir) / CONFIG_FILE,
                    config.to_json_best_effort(indent=2, sort_keys=True),
                    atomic=True)  # never half-written


def _tuples(value):
  """JSON lists back to the tuples configs use (configs hold no lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (`config_lib.ADDED_KEYS`
  filled in for runs older than a key)."""
  path = fileio.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} holds no training run (it is "
        "written when `python -m farmer_jax.main` starts). Pass the run's "
        "--workdir, or --config=configs/<name>.py for a run made before "
        "config.json existed.")
  raw = fileio.read_json(path)
  for section, defaults in config_lib.ADDED_KEYS.items():
    node = raw.setdefault(section, {}) if section else raw
    for key, value in defaults.items():
      node.setdefault(key, value(node) if callable(value) else value)
  return ml_collections.ConfigDict(_tuples(raw))

