"""Faults done for real: kill -9, a crash mid-save, NaN steps, bad configs,
bad image files, a foreign checkpoint and failing writes.

Training runs are subprocesses of `python -m farmer_jax.main` on
`configs/digits.py:tiny` (1 CPU device, 10 steps, a checkpoint every 2),
killed with SIGKILL where a test says so. They share one persistent XLA
compilation cache, so only the first run compiles, and every run injects NaN
batches at steps 3 and 4 (`config.debug_nonfinite_steps`): the train step is
then one program for all of them, and the reference run doubles as the test
that non-finite steps are skipped and counted.

Two faults need a hook inside the child, installed by `_HOOKED_MAIN` before
it calls `main`: 'block_commit' stops Orbax just before it renames a written
step directory into place (so the kill lands mid-save, deterministically);
'pause_before_save:N' waits on stdin before saving step N, so the test can
cap the child's file size with RLIMIT_FSIZE (prlimit) first. That cap makes
every later write fail in the kernel with EFBIG, through the real Orbax /
TensorStore code path; it works without root or a mount, unlike a full
tmpfs or a read-only directory (root ignores permissions).
"""
import contextlib
import fcntl
import hashlib
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest

import config_test
import helpers
from farmer_jax import checkpointing
from farmer_jax import config_lib
from farmer_jax import inference
from farmer_jax import input_pipeline
from farmer_jax import sharding
from farmer_jax import train
from farmer_jax.models import Farmer

TOTAL_STEPS = 10
CKPT_EVERY = 2
NAN_STEPS = (3, 4)
RUN_FLAGS = (
    "--config=configs/digits.py:tiny",
    f"--config.total_steps={TOTAL_STEPS}",
    f"--config.ckpt_every={CKPT_EVERY}",
    "--config.keep_ckpts=10",
    "--config.log_every=1",  # a log line per step: the test sees progress.
    f"--config.eval_every={TOTAL_STEPS}",
    "--config.num_eval_batches=1",
    "--config.warmup_steps=2",
    f"--config.debug_nonfinite_steps={NAN_STEPS}",
)
TIMEOUT_S = 480  # one run; the first compiles (~1 min on 2 idle cores).
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's in-progress step directories.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_HOOKED_MAIN = r'''
import os, sys, time
from absl import app
from farmer_jax import checkpointing, main
from orbax.checkpoint._src.path import atomicity

hook, _, arg = os.environ["FAULT_HOOK"].partition(":")
if hook == "block_commit":
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def blocked_finalize(self, *args, **kwargs):
    if self._final_path.name.isdigit():  # a step, not an item inside one.
      print(f"FAULT_HOOK blocked commit of {self.get()}", flush=True)
      time.sleep(3600)
    return await finalize(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = blocked_finalize
elif hook == "pause_before_save":
  save = checkpointing.Checkpointer.save
  def paused_save(self, step, *args):
    if step == int(arg):
      print(f"FAULT_HOOK paused before save {step}", flush=True)
      sys.stdin.readline()
    return save(self, step, *args)
  checkpointing.Checkpointer.save = paused_save
app.run(main.main)
'''


# ------------------------------------------------------------ subprocesses ---


class Run:
  """A training subprocess whose merged stdout/stderr the test reads."""

  def __init__(self, workdir, *flags, cache_dir, hook=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=helpers.xla_flags(1),
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    if hook:
      env["FAULT_HOOK"] = hook
      program = [sys.executable, "-c", _HOOKED_MAIN]
    else:
      program = [sys.executable, "-m", "farmer_jax.main"]
    self.workdir = str(workdir)
    self.popen = subprocess.Popen(
        program + [f"--workdir={workdir}", *RUN_FLAGS, *flags],
        cwd=helpers.REPO, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
    self.deadline = time.time() + TIMEOUT_S
    self.lines, self._queue = [], queue.Queue()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.popen.stdout:
      self.lines.append(line)
      self._queue.put(line)
    self._queue.put(None)

  @property
  def log(self) -> str:
    return "".join(self.lines)

  def tail(self, n: int = 40) -> str:
    return "".join(self.lines[-n:])

  def wait_for(self, pattern: str) -> re.Match:
    """Blocks until a line matches `pattern` (fails on exit or timeout)."""
    while True:
      try:
        line = self._queue.get(timeout=max(self.deadline - time.time(), 0))
      except queue.Empty:
        pytest.fail(f"no line matching {pattern!r} in {TIMEOUT_S} s:\n"
                    f"{self.tail()}")
      if line is None:
        pytest.fail(f"exited (rc={self.popen.wait()}) before a line matching "
                    f"{pattern!r}:\n{self.tail()}")
      if match := re.search(pattern, line):
        return match

  def finish(self) -> int:
    rc = self.popen.wait(timeout=max(self.deadline - time.time(), 1))
    self._reader.join(timeout=10)
    return rc

  def kill9(self) -> None:
    os.kill(self.popen.pid, signal.SIGKILL)
    assert self.popen.wait(timeout=30) == -signal.SIGKILL
    self._reader.join(timeout=10)


@pytest.fixture
def runs():
  """Starts `Run`s; kills any still alive when the test ends."""
  started = []

  def start(*args, **kwargs):
    started.append(Run(*args, **kwargs))
    return started[-1]

  yield start
  for run in started:
    if run.popen.poll() is None:
      run.popen.kill()
      run.popen.wait()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A directory every pytest-xdist worker of this session sees, locked."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above each worker's.
  root = root / "reliability"
  root.mkdir(exist_ok=True)
  return root


@contextlib.contextmanager
def _locked(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def cache_dir(shared):
  return shared / "jax_cache"


@pytest.fixture(scope="module")
def reference(shared, cache_dir):
  """The uninterrupted run, done once per session (it fills the cache)."""
  workdir = shared / "reference"
  with _locked(shared / "reference.lock"):
    if not (shared / "reference.done").exists():
      run = Run(workdir, cache_dir=cache_dir)
      assert run.finish() == 0, run.tail()
      (shared / "reference.done").write_text(run.log)
  return str(workdir)


# ----------------------------------------------------- checkpoint helpers ---


def _config(**overrides):
  """digits:tiny as the subprocesses run it (model and schedule)."""
  config = helpers.load_config("digits", "tiny")
  config.update(dict(total_steps=TOTAL_STEPS, ckpt_every=CKPT_EVERY,
                     warmup_steps=2))
  config.update(overrides)
  return config


_ABSTRACT = {}


def restore(workdir, step):
  """The TrainState of `step` as numpy arrays (restored onto 8 devices)."""
  config = _config()
  if "state" not in _ABSTRACT:
    _, _ABSTRACT["state"], _ = train.create_sharded_state(  # traced only
        config, Farmer(config.model), train.create_optimizer(config)[0],
        sharding.create_mesh(config))
  checkpointer = checkpointing.Checkpointer(str(workdir), config)
  try:
    state = checkpointer.restore_state(step, _ABSTRACT["state"])
  finally:
    checkpointer.close()
  return jax.device_get(state)


def steps_on_disk(workdir):
  """(finalized steps, names of in-progress step directories)."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if n.endswith(TMP_SUFFIX)))


def assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


def all_finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def last_error(log: str) -> str:
  """The exception line that ended a run (the last traceback's last line)."""
  errors = re.findall(r"^[\w.]+(?:Error|Exception): .*$", log, re.MULTILINE)
  return errors[-1] if errors else ""


def file_digests(root):
  """{relative path: sha256} of every file under root."""
  digests = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, root)] = hashlib.sha256(
            f.read()).hexdigest()
  return digests


# ---------------------------------------------------------- kill and save ---


def test_kill9_at_random_step_and_mid_save_then_resume_exactly(
    tmp_path, runs, reference, cache_dir):
  workdir = tmp_path / "run"
  # 1. kill -9 at a random step (seeded). From step 5 on, the save of step
  # 2 has finished: Orbax waits for one save before starting the next.
  kill_step = random.Random(20251123).randint(5, TOTAL_STEPS - 3)
  first = runs(workdir, cache_dir=cache_dir)
  first.wait_for(rf"\] \[{kill_step}\] train/")
  first.kill9()
  done, _ = steps_on_disk(workdir)
  assert done, first.tail()

  # 2. Resume, and kill -9 while the first new checkpoint is being written.
  second = runs(workdir, cache_dir=cache_dir, hook="block_commit")
  resumed = int(second.wait_for(r"Restoring checkpoint step (\d+)").group(1))
  assert resumed == done[-1]  # the last complete checkpoint, none lost.
  tmp_dir = second.wait_for(r"FAULT_HOOK blocked commit of (\S+)").group(1)
  saving = resumed + CKPT_EVERY
  assert os.path.basename(tmp_dir) == f"{saving}{TMP_SUFFIX}"
  assert os.listdir(os.path.join(tmp_dir, "state"))  # half-way: data written.
  second.kill9()
  assert steps_on_disk(workdir) == (done, [f"{saving}{TMP_SUFFIX}"])

  # 3. Restart with no cleanup by hand: the partial step is never restored.
  third = runs(workdir, cache_dir=cache_dir)
  assert third.finish() == 0, third.tail()
  assert f"Restoring checkpoint step {resumed} " in third.log  # one interval.
  assert f"Training from step {resumed} to {TOTAL_STEPS}." in third.log
  final_steps, leftovers = steps_on_disk(workdir)
  assert final_steps[-1] == TOTAL_STEPS and not leftovers

  # Same parameters, optimizer, EMA, RNG and counters as never interrupted.
  assert_trees_equal(restore(workdir, TOTAL_STEPS),
                     restore(reference, TOTAL_STEPS))
  # ...and the same data order: the saved Grain iterator states agree.
  iterator_file = os.path.join("checkpoints", str(TOTAL_STEPS), "data_iter",
                               "process_0-of-1.json")
  with open(os.path.join(workdir, iterator_file)) as a, open(
      os.path.join(reference, iterator_file)) as b:
    assert a.read() == b.read()


# ----------------------------------------------------------- non-finite ---


def test_nonfinite_steps_are_skipped_and_counted(reference):
  before, during, after, last = (restore(reference, s) for s in (2, 4, 6, 10))
  # Steps 3 and 4 (NaN batches) changed nothing but the counters...
  assert_trees_equal((during.params, during.opt_state, during.ema_params),
                     (before.params, before.opt_state, before.ema_params))
  assert (int(during.nonfinite_total), int(during.nonfinite_in_a_row)) == (2, 2)
  assert (int(before.nonfinite_total), int(before.step)) == (0, 2)
  # ...and training went on after them.
  moved = max(np.abs(a - b).max() for a, b in zip(
      jax.tree.leaves(after.params), jax.tree.leaves(during.params)))
  assert moved > 0
  assert (int(last.nonfinite_total), int(last.nonfinite_in_a_row)) == (2, 0)
  assert all(all_finite(s) for s in (before, during, after, last))


def test_nonfinite_in_a_row_aborts_naming_the_step(tmp_path, runs, reference,
                                                   cache_dir):
  del reference  # only for its compiled programs in the cache.
  workdir = tmp_path / "run"
  run = runs(workdir, "--config.max_consecutive_nonfinite=2",
             cache_dir=cache_dir)
  assert run.finish() != 0
  assert last_error(run.log).startswith(
      "farmer_jax.loop.NonFiniteError: 2 non-finite steps in a row, the "
      "last at step 4"), run.tail()
  # Nothing saved after the abort, and nothing saved is corrupt.
  assert steps_on_disk(workdir) == ([2, 4], [])
  saved = [restore(workdir, s) for s in (2, 4)]
  assert all(all_finite(s) for s in saved)
  assert_trees_equal(saved[1].params, saved[0].params)


# ------------------------------------------------------- wrong checkpoint ---


def test_checkpoint_of_another_model_fails_and_is_untouched(reference):
  # In-process (the function main calls): it fails before compiling anything.
  before = file_digests(reference)
  config = _config()
  config.model.af_width = 16
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    train.train_and_evaluate(config, reference)
  error = str(info.value)
  assert (error.startswith("The checkpoint at step 10")
          and "model.af_width: checkpoint has 32, config has 16" in error
          and "Use a new --workdir" in error), error
  assert file_digests(reference) == before


def test_matmul_precision_may_differ_from_the_checkpoint(reference):
  # How the matmuls run, not what the parameters define
  # (config_lib.RUNTIME_MODEL_KEYS): a run saved before the key existed
  # ('default', ADDED_KEYS) resumes under the configs' 'highest', and a
  # TF32-trained run restores with float32 matmuls for evaluation.
  for precision in ("default", "high"):
    config = _config()
    config.model.matmul_precision = precision
    ckpt = checkpointing.Checkpointer(reference, config, read_only=True)
    try:
      ckpt.check_config(ckpt.latest_step())
    finally:
      ckpt.close()
  run = inference.restore(reference, matmul_precision="default")
  assert run.model.config.matmul_precision == "default"
  assert run.config.model.matmul_precision == "default"
  assert inference.load_config(reference).model.matmul_precision == "highest"
  with pytest.raises(config_lib.ConfigError, match="matmul_precision='tf32'"):
    inference.restore(reference, matmul_precision="tf32")


# ----------------------------------------------------- failing disk writes ---


def test_failing_writes_during_save_keep_the_previous_checkpoint(
    tmp_path, runs, reference, cache_dir):
  del reference  # only for its compiled programs in the cache.
  workdir = tmp_path / "run"
  # keep_ckpts=1: a successful save of step 4 would delete step 2.
  run = runs(workdir, "--config.keep_ckpts=1", cache_dir=cache_dir,
             hook="pause_before_save:4")
  run.wait_for(r"FAULT_HOOK paused before save 4")
  deadline = time.time() + 60
  while steps_on_disk(workdir)[0] != [2]:  # step 2 still finishing?
    assert time.time() < deadline, steps_on_disk(workdir)
    time.sleep(0.05)
  kept = file_digests(os.path.join(workdir, "checkpoints", "2"))
  # From now on every write to a regular file fails with EFBIG.
  resource.prlimit(run.popen.pid, resource.RLIMIT_FSIZE, (0, 0))
  run.popen.stdin.write("go\n")
  run.popen.stdin.flush()
  assert run.finish() != 0
  error = last_error(run.log)
  assert (error.startswith("farmer_jax.checkpointing.CheckpointSaveError: "
                           "Saving the checkpoint of step 4 to ")
          and "File too large" in error and "(the latest: step 2)" in error
          and "rerun the same command to resume" in error), run.tail()
  assert steps_on_disk(workdir)[0] == [2]
  assert file_digests(os.path.join(workdir, "checkpoints", "2")) == kept
  state = restore(workdir, 2)
  assert int(state.step) == 2 and all_finite(state)


# ------------------------------------------------------------ bad configs ---


@pytest.mark.parametrize("overrides, field, fix", config_test.BAD,
                         ids=[",".join(o) for o, _, _ in config_test.BAD])
def test_bad_config_fails_before_compiling_or_writing(tmp_path, overrides,
                                                      field, fix):
  compiled = []

  def on_event(event, duration, **kwargs):
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      compiled.append(event)

  workdir = tmp_path / "run"
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    with pytest.raises(config_lib.ConfigError) as info:
      train.train_and_evaluate(config_test._tiny(**overrides), str(workdir))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert field in str(info.value) and fix in str(info.value)
  assert not workdir.exists()
  assert not compiled


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory this process cannot write into, even as root."""
  path = tmp_path / "read_only"
  path.mkdir()
  if os.geteuid() != 0:
    path.chmod(0o500)
    yield path
    path.chmod(0o700)
    return
  # Root ignores mode bits, but not a read-only mount.
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                          str(path)], capture_output=True, check=False)
  if mount.returncode:
    pytest.skip("root without permission to mount: no read-only directory")
  yield path
  subprocess.run(["umount", str(path)], check=True)


def test_unwritable_workdir_fails_before_anything(read_only_dir):
  with pytest.raises(config_lib.ConfigError,
                     match=r"--workdir=.* is not writable by this user; "
                     r"choose a writable --workdir"):
    train.train_and_evaluate(_config(), str(read_only_dir / "run"))


def test_workdir_under_a_file_fails_before_anything(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(config_lib.ConfigError, match=r"is a file.*choose"):
    train.train_and_evaluate(_config(), str(tmp_path / "file" / "run"))


# --------------------------------------------------------------- bad data ---


def _write(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path)


def test_bad_image_files_never_reach_a_batch(tmp_path, caplog):
  """RGB set with a corrupt, a truncated, a gray and a wrong-size file."""
  rng = np.random.default_rng(0)
  root = str(tmp_path / "images")
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      for i in range(4):
        _write(os.path.join(root, split, name, f"{i}.png"),
               rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
  train_dir = os.path.join(root, "train")
  _write(os.path.join(train_dir, "cat", "gray.png"),
         rng.integers(0, 256, (8, 8), dtype=np.uint8))
  _write(os.path.join(train_dir, "dog", "big.png"),
         rng.integers(0, 256, (24, 16, 3), dtype=np.uint8))
  with open(os.path.join(train_dir, "dog", "corrupt.png"), "wb") as f:
    f.write(rng.bytes(200))
  with open(os.path.join(train_dir, "cat", "0.png"), "rb") as f:
    png = f.read()
  with open(os.path.join(train_dir, "cat", "truncated.png"), "wb") as f:
    f.write(png[:len(png) // 2])
  config = _config(batch_size=4)
  config.data.update(source="folder", folder=root)
  config.model.channels = 3
  # Every image training may see: the 10 readable files, fitted.
  expected = {}
  for name, label in (("cat", 0), ("dog", 1)):
    for file in sorted(os.listdir(os.path.join(train_dir, name))):
      if file not in ("corrupt.png", "truncated.png"):
        with Image.open(os.path.join(train_dir, name, file)) as image:
          fitted = input_pipeline.fit_image(np.asarray(image), 8, 3)
        expected[fitted.tobytes()] = (label, f"{name}/{file}")
  assert len(expected) == 10

  with caplog.at_level("WARNING"):
    iterator = input_pipeline.create_train_iterator(config, process_index=0,
                                                    process_count=1)
    batches = [next(iterator) for _ in range(10)]  # 4 epochs of 2.5 batches.
  assert any("skipped 2 corrupt or unreadable image file(s) of 12" in
             r.getMessage() for r in caplog.records)
  seen = set()
  for batch in batches:
    assert batch["image"].shape == (4, 8, 8, 3)
    assert batch["image"].dtype == np.uint8
    for image, label in zip(batch["image"], batch["label"]):
      assert expected[image.tobytes()][0] == label  # a known, fitted image.
      seen.add(expected[image.tobytes()][1])
  assert {"cat/gray.png", "dog/big.png"} <= seen and len(seen) == 10

  # A file that goes bad while training runs stops it, naming the file.
  broken = os.path.join(train_dir, "dog", "1.png")
  with open(broken, "wb") as f:
    f.write(b"no longer a png")
  with pytest.raises(Exception, match=re.escape(broken)):
    for _ in range(40):  # past the batches already read ahead.
      next(iterator)
