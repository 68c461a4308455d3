"""Two JAX processes on localhost train exactly like one: losses, eval, resume.

`python -m farmer_jax.main` runs the tiny config on a 4-device global mesh
twice, at the same time: as 2 processes x 2 fake CPU devices (coordinator on
127.0.0.1, gloo CPU collectives), data-parallel, stopping at step 6; and as 1
process x 4 devices with the parameters sharded (FSDP), to step 8. Per-step
losses (TensorBoard events, `log_every=1`) and test bits/dim must agree to
1e-5. Then one process on the FSDP mesh resumes the 2-process checkpoint and
trains to step 8: its losses must equal the 1-process run's, which checks the
resharded restore and the data iterator's position on another host count.
Beside that resume, 2 processes distil the 1-process run's flow inverse for
a few steps: its evaluation gathers across hosts.

Every child runs in its own session and is killed (by its process group) if
the test fails or a timeout passes. To keep CI time down, children compile
with XLA's cheapest backend settings (both sides alike), and the resuming
process reuses the 1-process run's executables (persistent compilation
cache: same program).
"""
import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import helpers

STOP, STEPS = 6, 8  # the 2 processes stop (and evaluate) at STOP.
DISTILL_STEPS = 2
TOLERANCE = 1e-5  # f32; only the order of cross-process reductions differs.
TIMEOUT_S = 300  # per phase; a phase takes ~40 s on 2 idle cores.


def _main(workdir: str, mesh_shape: str = "(4,1,1)", *flags) -> list:
  return [sys.executable, "-m", "farmer_jax.main",
          "--config=configs/digits.py:tiny", f"--workdir={workdir}",
          f"--config.total_steps={STEPS}", "--config.warmup_steps=2",
          "--config.log_every=1", f"--config.eval_every={STOP}",
          f"--config.ckpt_every={STOP}", "--config.num_eval_batches=1",
          f"--config.mesh_shape={mesh_shape}", *flags]


def _distill(workdir: str, teacher: str, *flags) -> list:
  """2 steps of distilling `teacher` (4-device data-parallel mesh)."""
  return [sys.executable, "-m", "farmer_jax.main",
          "--config=configs/digits_distill.py:tiny", f"--workdir={workdir}",
          f"--config.distill.teacher_workdir={teacher}",
          f"--config.distill.total_steps={DISTILL_STEPS}",
          "--config.distill.warmup_steps=1", "--config.log_every=1",
          f"--config.eval_every={DISTILL_STEPS}",
          f"--config.ckpt_every={DISTILL_STEPS}",
          "--config.num_eval_batches=1", "--config.mesh_shape=(4,1,1)", *flags]


def _env(num_devices: int, cache_dir: str = "") -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=helpers.xla_flags(num_devices),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=helpers.REPO)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _children(log_dir):
  """Yields `start(name, argv, num_devices)`; kills what is left on exit."""
  procs = []

  def start(name, argv, num_devices, cache_dir=""):
    log = open(os.path.join(log_dir, f"{name}.log"), "w")
    proc = subprocess.Popen(argv, cwd=helpers.REPO,
                            env=_env(num_devices, cache_dir),
                            stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    proc.name, proc.log = name, os.path.join(log_dir, f"{name}.log")
    procs.append(proc)
    return proc

  try:
    yield start
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _wait_all(procs, timeout_s: float = TIMEOUT_S) -> None:
  """Waits for every process; fails at the first error or the timeout."""
  deadline = time.monotonic() + timeout_s
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.poll() not in (None, 0)]
    late = [p for p in procs if p.poll() is None]
    if failed or time.monotonic() > deadline:
      culprit = failed[0] if failed else late[0]
      why = f"exit {culprit.poll()}" if failed else f"{timeout_s} s timeout"
      raise AssertionError(f"{culprit.name}: {why}; its log ends:\n"
                           + open(culprit.log).read()[-3000:])
    time.sleep(0.2)
  for p in procs:
    assert p.returncode == 0, open(p.log).read()[-3000:]


def _assert_close(a: dict, b: dict, steps) -> None:
  for step in steps:
    assert abs(a[step] - b[step]) <= TOLERANCE, (step, a[step], b[step])


def test_global_batches_do_not_depend_on_the_number_of_hosts():
  """Host i reads row block i of every global batch (input_pipeline)."""
  from farmer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = helpers.load_config()
  one = input_pipeline.create_train_iterator(config, process_index=0,
                                             process_count=1)
  hosts = [input_pipeline.create_train_iterator(
      config, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    joined = [next(h) for h in hosts]
    expected = next(one)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([j[key] for j in joined]), expected[key])


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
  two, one = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  student = str(tmp_path / "student")
  cache = str(tmp_path / "jax_cache")
  address = f"127.0.0.1:{_free_port()}"
  with _children(str(tmp_path)) as start:
    procs = [start(f"process_{i}", _main(
        two, "(4,1,1)", f"--stop_at_step={STOP}",
        f"--coordinator_address={address}", "--num_processes=2",
        f"--process_id={i}",
        # A sample grid too: sampling's inputs and outputs span both hosts.
        "--config.sample.num_grid_images=4"), 2) for i in range(2)]
    procs.append(start("one_process", _main(one, "(1,4,1)"), 4, cache))
    _wait_all(procs)

    # Only process 0 wrote metrics (its pid is in the events file name) and
    # images; every process wrote its data iterator state.
    (events,) = glob.glob(os.path.join(two, "events.out.*"))
    assert f".{procs[0].pid}." in os.path.basename(events), events
    assert sorted(os.listdir(os.path.join(two, "images"))) == [
        f"reconstructions_{STOP}.png", f"samples_{STOP}.png"]
    iter_dir = os.path.join(two, "checkpoints", str(STOP), "data_iter")
    assert sorted(f for f in os.listdir(iter_dir) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    loss_two, loss_one = (helpers.scalars(w, "train/loss")
                          for w in (two, one))
    assert sorted(loss_two) == list(range(1, STOP + 1))
    assert sorted(loss_one) == list(range(1, STEPS + 1))
    _assert_close(loss_two, loss_one, range(1, STOP + 1))
    _assert_close(helpers.scalars(two, "eval/bpd"),
                  helpers.scalars(one, "eval/bpd"), [STOP])

    # One process on the FSDP mesh resumes the 2-process checkpoint. Beside
    # it, two processes distil the 1-process run's flow inverse:
    # evaluation gathers the student's reconstructions from both
    # hosts (`metrics.to_host`; a `device_get` fails across processes).
    resume = start("resume", _main(two, "(1,4,1)"), 4, cache)
    address = f"127.0.0.1:{_free_port()}"
    distillers = [start(f"distill_{i}", _distill(
        student, one, f"--coordinator_address={address}",
        "--num_processes=2", f"--process_id={i}"), 2) for i in range(2)]
    _wait_all([resume] + distillers)
  assert "written by another number of processes" in open(resume.log).read()
  loss_two = helpers.scalars(two, "train/loss")
  assert sorted(loss_two) == list(range(1, STEPS + 1))
  _assert_close(loss_two, loss_one, range(STOP + 1, STEPS + 1))
  _assert_close(helpers.scalars(two, "eval/bpd"),
                helpers.scalars(one, "eval/bpd"), [STEPS])
  assert os.path.exists(os.path.join(
      two, "images", f"reconstructions_{STEPS}.png"))

  # The 2-process student: metrics and images from process 0 only, an
  # iterator state per process, a finite evaluation before and after.
  (events,) = glob.glob(os.path.join(student, "events.out.*"))
  assert f".{distillers[0].pid}." in os.path.basename(events), events
  assert sorted(helpers.scalars(student, "train/loss")) == list(
      range(1, DISTILL_STEPS + 1))
  rmse = helpers.scalars(student, "eval/recon_rmse")
  assert sorted(rmse) == [0, DISTILL_STEPS]
  assert all(np.isfinite(v) and 0 < v < 1 for v in rmse.values()), rmse
  assert sorted(os.listdir(os.path.join(student, "images"))) == [
      f"student_reconstructions_{s}.png" for s in (0, DISTILL_STEPS)]
  iter_dir = os.path.join(student, "checkpoints", str(DISTILL_STEPS),
                          "data_iter")
  assert sorted(f for f in os.listdir(iter_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
