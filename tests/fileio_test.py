"""Every file a run writes or reads goes through farmer_jax.fileio (gs://).

The real writers and readers run against a fake `gs://` bucket (the
`fake_gcs` fixture, tests/helpers.py `FakeBucket`): epath's `gs://` backend
replaced by one that keeps objects in a local folder and records its calls.
A plain `open` / `os.makedirs` / ... of a `gs:` path raises there, and no
folder named `gs:` may appear in the working directory. An AST scan keeps
new code on the path layer.
"""
import ast
import json
import os
import types

import flax
import jax
import numpy as np
from PIL import Image
import pytest

import helpers
from farmer_jax import checkpointing
from farmer_jax import classifier
from farmer_jax import config_lib
from farmer_jax import diagnose
from farmer_jax import evaluate
from farmer_jax import fileio
from farmer_jax import inception
from farmer_jax import input_pipeline
from farmer_jax import metrics
from farmer_jax import sample
from farmer_jax import score
from farmer_jax.config_lib import ConfigError

RUN = "gs://bucket/run"


def _image(seed=0, shape=(6, 10, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def _png(bucket, uri) -> np.ndarray:
  """The pixels of the PNG stored at `uri`, read past the path layer."""
  with Image.open(bucket.local(uri)) as im:
    return np.asarray(im)


def test_config_round_trips_through_a_bucket(fake_gcs):
  config = helpers.load_config("digits", "tiny")
  checkpointing.save_config(config, RUN)
  assert fake_gcs.written() == [f"{RUN}/config.json"]
  with open(fake_gcs.local(f"{RUN}/config.json")) as f:
    assert json.load(f)["model"]["patch_size"] == config.model.patch_size
  loaded = checkpointing.load_config(RUN)
  assert loaded.model.to_dict() == config.model.to_dict()
  assert loaded.mesh_shape == config.mesh_shape  # lists back to tuples
  with pytest.raises(FileNotFoundError, match="gs://bucket/other"):
    checkpointing.load_config("gs://bucket/other")


def test_local_config_write_is_atomic(tmp_path):
  config = helpers.load_config("digits", "tiny")
  checkpointing.save_config(config, str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == ["config.json"]  # no .tmp left
  assert checkpointing.load_config(str(tmp_path / "run")).seed == config.seed


def test_png_grid_lands_in_the_bucket(fake_gcs):
  grid = metrics.make_grid(np.stack([_image(i) for i in range(4)]))
  metrics.save_png(grid, f"{RUN}/images/samples_7.png")
  np.testing.assert_array_equal(_png(fake_gcs, f"{RUN}/images/samples_7.png"),
                                grid)
  gray = grid[..., :1]
  metrics.save_png(gray, f"{RUN}/images/gray.png")
  np.testing.assert_array_equal(_png(fake_gcs, f"{RUN}/images/gray.png"),
                                gray[..., 0])


def test_sweep_csv_and_plot_land_in_the_bucket(fake_gcs):
  rows = [dict(cfg_scale=w, accuracy=0.5 + w / 10, frechet=3.0 - w,
               num_samples=8) for w in (0.0, 1.0)]
  evaluate.write_sweep(rows, fileio.path(RUN) / "eval" / "cfg_sweep_5")
  with open(fake_gcs.local(f"{RUN}/eval/cfg_sweep_5.csv")) as f:
    assert f.read().splitlines() == [
        "cfg_scale,accuracy,frechet,num_samples",
        "0.0,0.5000,3.0000,8", "1.0,0.6000,2.0000,8"]
  assert _png(fake_gcs, f"{RUN}/eval/cfg_sweep_5.png").ndim == 3


def test_inception_reference_is_cached_in_the_bucket(fake_gcs):
  """evaluate.inception_reference writes its `.npz` to the bucket and reads
  it back instead of recomputing (a fake evaluator counts the passes)."""
  config = helpers.load_config("digits", "tiny")
  passes = []

  def moments(chunks):
    feats = np.concatenate([c.reshape(len(c), -1)[:, :3] for c in chunks])
    passes.append(len(feats))
    return types.SimpleNamespace(
        stats=lambda: (feats.mean(0), np.cov(feats, rowvar=False)))

  ev = types.SimpleNamespace(weights_id="w:1", batch_size=4, moments=moments)
  run = types.SimpleNamespace(config=config, workdir=RUN)
  mu, sigma = evaluate.inception_reference(run, "test", ev, 10)
  again = evaluate.inception_reference(run, "test", ev, 10)
  assert passes == [10]  # the second call read the cache
  np.testing.assert_array_equal(again[0], mu)
  np.testing.assert_array_equal(again[1], sigma)
  assert fake_gcs.written() == [f"{RUN}/inception/ref_test_10.npz"]
  ev.weights_id = "w:2"  # other weights: recomputed
  evaluate.inception_reference(run, "test", ev, 10)
  assert passes == [10, 10]


def test_sample_grid_and_npz_land_in_the_bucket(fake_gcs):
  images = np.stack([_image(i) for i in range(6)])
  labels = np.arange(6, dtype=np.int32) % 3
  png, npz = sample.save(images, labels, f"{RUN}/samples/s_1_w1.png", 3)
  assert (str(png), str(npz)) == (f"{RUN}/samples/s_1_w1.png",
                                  f"{RUN}/samples/s_1_w1.npz")
  with np.load(fake_gcs.local(npz)) as f:
    np.testing.assert_array_equal(f["images"], images)
    np.testing.assert_array_equal(f["labels"], labels)
  np.testing.assert_array_equal(_png(fake_gcs, png),
                                metrics.make_grid(images, ncol=3))


def test_diagnosis_lands_in_the_bucket(fake_gcs):
  result = dict(step=3, hybrids={"recon": dict(accuracy=1.0, frechet=0.0)})
  grid = metrics.make_grid(np.stack([_image(i) for i in range(2)]))
  diagnose.write(f"{RUN}/diagnosis", result, grid)
  with open(fake_gcs.local(f"{RUN}/diagnosis/diagnosis.json")) as f:
    assert json.load(f) == result
  np.testing.assert_array_equal(
      _png(fake_gcs, f"{RUN}/diagnosis/diagnosis.png"), grid)


def test_classifier_cache_lands_in_and_loads_from_the_bucket(fake_gcs,
                                                             monkeypatch):
  config = helpers.load_config("digits", "tiny")
  s, c = config.model.image_size, config.model.channels
  shapes = jax.eval_shape(classifier.CNN(config.model.num_classes).init,
                          jax.random.PRNGKey(3),
                          np.zeros((1, s, s, c), np.uint8))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype),
                        shapes)
  trained = []
  monkeypatch.setattr(classifier, "_train",
                      lambda *_: trained.append(1) or (params, 0.75))
  classifier.load_or_train(config, RUN)
  assert fake_gcs.written() == [f"{RUN}/classifier/params.msgpack",
                                f"{RUN}/classifier/info.json"]
  _, loaded, info = classifier.load_or_train(config, RUN)
  assert trained == [1] and info["test_accuracy"] == 0.75
  assert flax.serialization.to_bytes(loaded) == flax.serialization.to_bytes(
      params)


def test_inception_weights_load_from_the_bucket(fake_gcs):
  """A weights `.npz` in a bucket passes the config check and loads."""
  arrays = {k: np.zeros(shape, np.float32)
            for k, shape in inception.expected_keys(False).items()}
  fileio.save_npz("gs://bucket/inception_fid.npz", **arrays)
  config = helpers.load_config("digits", "tiny")
  config.inception.weights = "gs://bucket/inception_fid.npz"
  config_lib.validate(config, num_devices=8, process_count=1)
  ev = inception.Evaluator(config.inception.weights)
  size = os.path.getsize(fake_gcs.local("gs://bucket/inception_fid.npz"))
  assert ev.weights_id == f"gs://bucket/inception_fid.npz:{size}"
  assert not ev.with_logits


def test_score_reads_images_from_the_bucket(fake_gcs):
  for i in range(2):
    metrics.save_png(_image(i, (8, 8, 1)), f"gs://bucket/imgs/a/{i}.png")
  fileio.write_text("gs://bucket/imgs/notes.txt", "not an image")
  files = score.list_files(["gs://bucket/imgs"])
  assert files == ["gs://bucket/imgs/a/0.png", "gs://bucket/imgs/a/1.png"]
  np.testing.assert_array_equal(score.load_image(files[1], 8, 1),
                                _image(1, (8, 8, 1)))


def test_folder_dataset_reads_from_the_bucket(fake_gcs):
  for name in ("cat", "dog"):
    for i in range(5):
      metrics.save_png(_image(i, (8, 8, 3)), f"gs://bucket/data/{name}/{i}.png")
  config = helpers.load_config("digits", "tiny")
  config.data.source, config.data.folder = "folder", "gs://bucket/data"
  config.model.channels = 3
  train = input_pipeline.get_source(config, "train")
  test = input_pipeline.get_source(config, "test")
  assert (len(train), len(test)) == (9, 1)
  assert train[0]["image"].shape == (config.model.image_size,) * 2 + (3,)


def test_remote_workdir_is_checked_by_writing_to_it(fake_gcs):
  config_lib.check_workdir(f"{RUN}/new")
  assert os.path.isdir(fake_gcs.local(f"{RUN}/new"))
  assert os.listdir(fake_gcs.local(f"{RUN}/new")) == []  # probe removed
  assert [c[0] for c in fake_gcs.calls].count("remove") == 1


def test_remote_workdir_that_is_a_file_is_refused(fake_gcs):
  fileio.write_text(f"{RUN}/taken", "")
  with pytest.raises(ConfigError, match=r"--workdir=gs://bucket/run/taken is "
                     "a file.*choose"):
    config_lib.check_workdir(f"{RUN}/taken")


def test_unwritable_remote_workdir_is_refused(fake_gcs, monkeypatch):
  def denied(*_):
    raise PermissionError("403 storage.objects.create denied")
  monkeypatch.setattr(fake_gcs, "open", denied)
  with pytest.raises(ConfigError, match=r"--workdir=gs://bucket/run cannot "
                     r"be written \(PermissionError: 403.*bucket exists"):
    config_lib.check_workdir(RUN)


def test_bypassing_the_path_layer_is_caught(fake_gcs):
  """The fake is strict: plain `os.makedirs` + `open` writers fail."""
  with pytest.raises(AssertionError, match="bypassed the path layer"):
    os.makedirs(f"{RUN}/images", exist_ok=True)
  with pytest.raises(AssertionError, match="bypassed the path layer"):
    Image.fromarray(_image()).save(f"{RUN}/x.png")
  with pytest.raises(AssertionError, match="bypassed the path layer"):
    np.savez(f"{RUN}/x.npz", a=np.zeros(2))


def test_fileio_round_trips_locally(tmp_path):
  target = tmp_path / "a" / "b" / "x.json"
  fileio.write_json(target, {"k": [1, 2]}, atomic=True)
  assert fileio.read_json(target) == {"k": [1, 2]}
  assert os.listdir(target.parent) == ["x.json"]
  fileio.save_npz(tmp_path / "y.npz", compressed=True, a=np.arange(3))
  np.testing.assert_array_equal(fileio.load_npz(tmp_path / "y.npz")["a"],
                                np.arange(3))
  assert fileio.absolute("gs://b/x") == "gs://b/x"
  assert fileio.absolute("rel") == os.path.join(os.getcwd(), "rel")


# ------------------------------------------- no write bypasses fileio ---

# Calls that touch files by path. `open` is the builtin; `Image.open` is
# allowed on an in-memory buffer only.
_FILE_CALLS = {"open", "os.makedirs", "os.mkdir", "os.replace", "os.rename",
               "os.remove", "os.listdir", "os.walk", "os.stat",
               "os.path.exists", "os.path.isdir", "os.path.isfile",
               "np.load", "np.save", "np.savez", "np.savez_compressed",
               "shutil.copy", "shutil.rmtree", "Image.open"}
# (module, function) that may use them: the path layer itself, the local
# branch of the workdir check, and a file inside an installed package.
_ALLOWED = {("fileio", "*"), ("config_lib", "check_workdir"),
            ("inception", "find_fid_helper_weights")}


def _dotted(node) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return ""


def _on_a_buffer(call: ast.Call) -> bool:
  return bool(call.args) and isinstance(call.args[0], ast.Call) and (
      _dotted(call.args[0].func) == "io.BytesIO")


class _FileCalls(ast.NodeVisitor):
  """`found`: `(innermost function, call, line)` of file-by-path calls."""

  def __init__(self):
    self.functions, self.found = ["<module>"], []

  def visit_FunctionDef(self, node):
    self.functions.append(node.name)
    self.generic_visit(node)
    self.functions.pop()

  def visit_Call(self, node):
    name = _dotted(node.func)
    if name in _FILE_CALLS and not (name == "Image.open"
                                    and _on_a_buffer(node)):
      self.found.append((self.functions[-1], name, node.lineno))
    self.generic_visit(node)


def _file_calls(path: str):
  with open(path, encoding="utf-8") as f:
    visitor = _FileCalls()
    visitor.visit(ast.parse(f.read(), path))
  return visitor.found


def test_no_file_io_bypasses_the_path_layer():
  package = os.path.join(helpers.REPO, "farmer_jax")
  bad = []
  for root, _, names in os.walk(package):
    for name in sorted(n for n in names if n.endswith(".py")):
      module = name[:-len(".py")]
      for fn, call, line in _file_calls(os.path.join(root, name)):
        if (module, "*") not in _ALLOWED and (module, fn) not in _ALLOWED:
          bad.append(f"{os.path.relpath(os.path.join(root, name), package)}:"
                     f"{line} {fn}: {call}")
  assert not bad, ("File I/O past farmer_jax.fileio (a gs:// workdir would "
                   "become a local folder 'gs:'): " + "; ".join(bad))
