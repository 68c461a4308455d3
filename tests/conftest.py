"""pytest setup: 8 fake CPU devices before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by clu / tfds) must not grab threads or print noise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny digits run trained for a few hundred steps (tests/helpers.py)."""
  import helpers  # pylint: disable=g-import-not-at-top
  return helpers.trained_tiny_workdir(tmp_path_factory)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """`gs://` in a local folder (helpers.FakeBucket), run from an empty cwd.

  Yields the bucket; afterwards no local path named like the bucket (a
  `gs:` folder) may exist in the cwd.
  """
  import helpers  # pylint: disable=g-import-not-at-top
  bucket = helpers.FakeBucket(tmp_path / "bucket")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket.install(monkeypatch)
  yield bucket
  assert not [p.name for p in cwd.iterdir()], "a write bypassed fileio"
