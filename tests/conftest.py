"""pytest setup: 8 fake CPU devices before JAX's backend starts."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by clu / tfds) must not grab threads or print noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# helpers.FAST_COMPILE for this process and the subprocesses that inherit its
# environment; helpers.optimized() lifts it for compute-heavy tests.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# Many tests compile the same programs: three runs of one tiny config in
# train_test, `main` again in every CLI subprocess, the notebook's restore.
# JAX's persistent compilation cache compiles each of them once.  The
# controller makes one cache private to this pytest run; xdist workers and
# the tests' subprocesses inherit it through the environment.  Entries are
# keyed by the HLO and compile options, so a cached program is the program.
# A cache the user set (JAX_COMPILATION_CACHE_DIR) is used and kept.  Set
# before `helpers` imports JAX, which reads these variables on import (so
# pytest's own process, which compiles too, uses the cache).
_OWNED_CACHE = []
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWNED_CACHE.append(tempfile.mkdtemp(prefix="farmer_jax_test_xla_"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWNED_CACHE[0]
  # A size limit turns on JAX's file lock, so no process reads an entry
  # another is half-way through writing.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import helpers  # noqa: E402  (imports JAX; its backend starts later)

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 "
    + helpers.CHEAP_EMITTERS).strip()


# Files in the order xdist hands them to workers (pytest.ini: loadfile, no
# reorder): the longest first, so the run does not end with one worker on a
# two-minute file while the other idles. Seconds per file, summed over its
# tests, in a `python -m pytest -n 2 --durations=0` run on 2 cores; files
# not listed follow, in collection order. xdist's own
# order (most tests first) put multiprocess_test (2 tests, ~110 s) last.
LONGEST_FIRST = (
    "model_test.py",  # 226 s
    "sampling_test.py",  # 161
    "cli_test.py",  # 149, most of it the shared trained run (conftest)
    "benchmarks_test.py",  # 149
    "inception_test.py",  # 144
    "reliability_test.py",  # 139
    "jacobi_test.py",  # 150 alone (-n 0), the shared trained run included
    "pretrained_test.py",  # three CLI subprocesses on the 28x28 model
    "reference_test.py",  # 113
    "multiprocess_test.py",  # 108
    "distill_test.py",  # 65
    "aot_memory_test.py",  # 52
    "train_test.py",  # 50
    "diagnose_test.py",  # 48
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  del config
  for cache in _OWNED_CACHE:
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny digits run trained for a few hundred steps (tests/helpers.py)."""
  return helpers.trained_tiny_workdir(tmp_path_factory)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """`gs://` in a local folder (helpers.FakeBucket), run from an empty cwd.

  Yields the bucket; afterwards no local path named like the bucket (a
  `gs:` folder) may exist in the cwd.
  """
  bucket = helpers.FakeBucket(tmp_path / "bucket")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket.install(monkeypatch)
  yield bucket
  assert not [p.name for p in cwd.iterdir()], "a write bypassed fileio"
