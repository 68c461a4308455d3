"""Shared test helpers: config loading, random non-zero weights, a fake
gs:// bucket."""
import builtins
import contextlib
import glob
import importlib.util
import io
import os
import struct
import subprocess
import sys

from etils.epath import backend as epath_backend
from etils.epath import gpath
import flax.linen as nn
import jax
import numpy as np
from tensorboard.compat.proto import event_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests' programs are tiny, so XLA's compile, not running them, is most
# of the suite's time. LLVM without its optimisation passes compiles about
# twice as fast. XLA's own HLO passes (fusion, layout, sharding) still run
# and fast-math stays off: the same program, its results equal to rounding.
# Test subprocesses get it as XLA_FLAGS (`xla_flags`); pytest's own processes
# through JAX's `jax_disable_most_optimizations` (the same two settings, read
# at each compile), so that `optimized()` can lift it for the few tests whose
# time is spent running programs, not compiling them (convolutions run 3-4x
# slower unoptimised).
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")


def _if_accepted(flag: str) -> str:
  """`flag` if this jaxlib's XLA starts with it in XLA_FLAGS, else ''.

  An unknown XLA flag aborts the process, and setup.py does not pin jaxlib.
  Probed once per pytest run in a subprocess; the answer is kept in the
  environment, which xdist workers and test subprocesses inherit.
  """
  key = "FARMER_JAX_TEST_XLA_ACCEPTS"
  if key not in os.environ:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"),
        capture_output=True, check=False)
    os.environ[key] = flag if probe.returncode == 0 else ""
  return flag if os.environ[key] == flag else ""


# XLA's CPU backend emits fused loops through its newer MLIR "fusion
# emitters" by default; its older elemental emitter compiles the tiny train
# step of the tests (`Trainer(...).train_step.lower(...).compile()` on
# configs/digits.py:tiny) in 2.9 s instead of 7.4 s with FAST_COMPILE (12.9
# vs 14.7 s fully optimised) and runs as fast (benchmarks/train_throughput.py
# refS / digits with the flag in XLA_FLAGS: within noise). Every test process
# gets it: pytest's own through conftest.py, subprocesses through
# `xla_flags`.
CHEAP_EMITTERS = _if_accepted("--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess with `devices` fake CPU devices."""
  return (f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE} "
          f"{CHEAP_EMITTERS}")


@contextlib.contextmanager
def optimized():
  """Compiles with XLA's full optimisation inside the block.

  For compute-bound fixtures and tests (training a model for hundreds of
  steps, convolutions, dense grids): there, optimised code repays its longer
  compile. A function already compiled outside keeps its executable.
  """
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def load_config_module(name: str):
  """The module `configs/<name>.py`."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str = "digits", arg: str = "tiny"):
  """`configs/<name>.py:get_config(arg)`, unlocked for overrides."""
  return load_config_module(name).get_config(arg)


def randomize(params, seed: int = 0, scale: float = 0.2):
  """Adds N(0, scale^2) to every weight so no head is zero any more."""
  params = nn.meta.unbox(params)
  leaves, treedef = jax.tree.flatten(params)
  # One draw sliced over the leaves: one RNG op compiles much faster than
  # one per leaf.
  noise = jax.random.normal(jax.random.PRNGKey(seed),
                            (sum(a.size for a in leaves),))
  out, start = [], 0
  for a in leaves:
    out.append(a + scale * noise[start:start + a.size].reshape(a.shape))
    start += a.size
  return jax.tree.unflatten(treedef, out)

def init_random(model, x, labels, seed: int = 0, scale: float = 0.1):
  """`model.init` then `randomize`, both jitted (eager init is slow)."""
  @jax.jit
  def init(x, labels):
    variables = model.init({"params": jax.random.PRNGKey(seed),
                            "dropout": jax.random.PRNGKey(seed + 1)}, x, labels)
    return {"params": randomize(variables["params"], seed + 2, scale)}
  return init(x, labels)


# A tiny digits model trained once per test session and shared by every
# test that needs a trained run (sampling quality, scoring, the notebook,
# distillation): under pytest-xdist the first worker to ask trains it, the
# others wait on a file lock and reuse it.
TRAINED_STEPS = 300


def trained_tiny_config():
  config = load_config("digits", "tiny")
  config.update(dict(total_steps=TRAINED_STEPS, ckpt_every=TRAINED_STEPS,
                     eval_every=TRAINED_STEPS, log_every=50,
                     num_eval_batches=1, mesh_shape=(-1, 1, 1)))
  return config


def trained_tiny_workdir(tmp_path_factory) -> str:
  """Path of the shared trained tiny run (trains it on first use)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from farmer_jax import classifier  # pylint: disable=g-import-not-at-top
  from farmer_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by all workers of this session
  workdir = os.path.join(str(root), "trained_tiny")
  done = os.path.join(workdir, "DONE")
  with open(os.path.join(str(root), "trained_tiny.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.exists(done):
        config = trained_tiny_config()
        train.train_and_evaluate(config, workdir)
        # Its sample-quality classifier too, cached in the workdir, so no
        # test (or the notebook's kernel) trains one of its own. Convolutions
        # run ~3x faster optimised (79 s -> 23 s).
        with optimized():
          classifier.load_or_train(config, workdir)
        open(done, "w").close()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir


class FakeBucket(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """The `gs://` backend of `etils.epath`, kept in a local folder.

  `gs://b/x` is `<root>/b/x`; every call is recorded in `calls` as
  `(method, gs path, ...)`. `install` routes epath's `gs://` paths here and
  makes a plain `open` / `os.makedirs` / `os.replace` / ... of a `gs:` path
  raise, so code that bypasses the path layer fails instead of creating a
  local folder named `gs:`.
  """

  def __init__(self, root):
    self.root = str(root)
    self.calls = []
    os.makedirs(self.root, exist_ok=True)

  def local(self, path) -> str:
    """`<root>/b/x` for `gs://b/x`."""
    path = os.fspath(path)
    assert path.startswith("gs://"), f"not a bucket path: {path}"
    return os.path.join(self.root, path[len("gs://"):])

  def uri(self, local) -> str:
    return "gs://" + os.path.relpath(os.fspath(local), self.root)

  def _call(self, method, path, *args, **kwargs):
    self.calls.append((method, os.fspath(path)) + args)
    return getattr(super(), method)(self.local(path), *args, **kwargs)

  def open(self, path, mode):
    return self._call("open", path, mode)

  def exists(self, path):
    return self._call("exists", path)

  def isdir(self, path):
    return self._call("isdir", path)

  def listdir(self, path):
    return self._call("listdir", path)

  def glob(self, path):
    return [self.uri(p) for p in self._call("glob", path)]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in self._call("walk", top, top_down=top_down,
                                        on_error=on_error):
      yield self.uri(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return self._call("makedirs", path, exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return self._call("mkdir", path, exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return self._call("rmtree", path)

  def remove(self, path):
    return self._call("remove", path)

  def rename(self, path, dst):
    self.calls.append(("rename", os.fspath(path), os.fspath(dst)))
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    self.calls.append(("replace", os.fspath(path), os.fspath(dst)))
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    self.calls.append(("copy", os.fspath(path), os.fspath(dst)))
    return super().copy(self.local(path), self.local(dst),
                        overwrite=overwrite)

  def stat(self, path):
    return self._call("stat", path)

  def written(self) -> list:
    """The gs:// paths opened for writing, in order."""
    return [c[1] for c in self.calls if c[0] == "open" and "r" not in c[2]]

  def install(self, monkeypatch) -> None:
    """Routes `gs://` here and makes os-level use of a `gs:` path raise."""
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", self)  # pylint: disable=protected-access
    # With TensorFlow installed epath sends gs:// to tf.io.gfile instead.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    for module, name in ((builtins, "open"), (io, "open"), (os, "makedirs"),
                         (os, "mkdir"), (os, "replace"), (os, "rename"),
                         (os, "remove"), (os, "listdir"), (os, "stat")):
      monkeypatch.setattr(module, name, _refusing_gs(getattr(module, name)))


def _refusing_gs(fn):
  """`fn` that raises on a path that starts with `gs:` (a bypassed bucket
  path, which would otherwise become a local folder named `gs:`)."""
  def guarded(path, *args, **kwargs):
    if (isinstance(path, (str, bytes, os.PathLike))
        and os.fsdecode(path).startswith("gs:")):
      raise AssertionError(f"{fn.__name__}({path!r}) bypassed the path layer "
                           "(farmer_jax.fileio)")
    return fn(path, *args, **kwargs)
  return guarded


def _records(path):
  """The records of a TFRecord file (TensorBoard events), CRCs unchecked."""
  with open(path, "rb") as f:
    while len(header := f.read(12)) == 12:
      (length,) = struct.unpack("<Q", header[:8])
      yield f.read(length)
      f.read(4)


def scalars(workdir: str, tag: str) -> dict:
  """{step: value} of a scalar in every events file of `workdir`."""
  # Reads the protos directly: TensorBoard's loaders import TensorFlow.
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.*"))):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(np.frombuffer(value.tensor.tensor_content,
                                                np.float32)[0])
  return out
