"""Tests for farmer_jax.input_pipeline: sources, shards, resume, eval, TFDS."""
import collections
import functools
import importlib.util
import io
import json
import logging
import os
import re
import zlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from farmer_jax import input_pipeline

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config(arg="tiny", **overrides):
  """configs/digits.py:arg with dotted overrides, e.g. data__source='mnist'."""
  spec = importlib.util.spec_from_file_location(
      "digits_config", os.path.join(_CONFIGS, "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def _example_keys(images, labels):
  """Multiset of examples, identified by their pixels and label."""
  return collections.Counter(
      (image.tobytes(), int(label)) for image, label in zip(images, labels))


def _source_keys(source):
  examples = [source[i] for i in range(len(source))]
  return _example_keys([e["image"] for e in examples],
                       [e["label"] for e in examples])


# ------------------------------------------------------- embedded sources ---


@pytest.mark.parametrize("arg,size,num_train,num_test",
                         [("", 28, 4500, 500), ("tiny", 8, 1500, 297)])
def test_embedded_sources(arg, size, num_train, num_test):
  config = _config(arg)
  assert len(input_pipeline.get_source(config, "train")) == num_train
  test_source = input_pipeline.get_source(config, "test")
  assert len(test_source) == num_test
  # The CSV is sorted by label: a shuffled split holds every class.
  assert {int(test_source[i]["label"]) for i in range(num_test)} == set(
      range(10))
  batch = next(input_pipeline.create_train_iterator(
      config, process_index=0, process_count=1))
  b = config.batch_size
  assert batch["image"].shape == (b, size, size, 1)
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  assert batch["image"].max() == 255 and batch["image"].min() == 0
  assert batch["image"].mean() > 10  # real strokes, not blank images.
  assert batch["label"].shape == (b,)
  assert 0 <= batch["label"].min() and batch["label"].max() < 10


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="config.batch_size=16 is not divisible"):
    input_pipeline.create_train_iterator(
        _config(), process_index=0, process_count=3)
  with pytest.raises(ValueError, match="config.eval_batch_size"):
    input_pipeline.create_eval_iterator(
        _config(eval_batch_size=30), "test", process_index=0, process_count=4)
  with pytest.raises(ValueError, match="config.data.source='cifar'"):
    input_pipeline.get_source(_config(data__source="cifar"), "train")
  with pytest.raises(ValueError, match="config.data.train_split"):
    input_pipeline.get_source(_config(), "validation")


# ------------------------------------------------------ train iterator ---


def test_hosts_get_disjoint_shards_that_cover_an_epoch():
  # 1500 train images, 2 hosts x 10 per batch: 75 batches per host per epoch.
  config = _config(batch_size=20)
  hosts = [input_pipeline.create_train_iterator(
      config, process_index=i, process_count=2) for i in range(2)]
  epoch = [_take(host, 75) for host in hosts]
  first = [batches[0] for batches in epoch]
  assert first[0]["image"].shape == (10, 8, 8, 1)
  assert not set(_example_keys(first[0]["image"], first[0]["label"])) & set(
      _example_keys(first[1]["image"], first[1]["label"]))
  seen = collections.Counter()
  for batches in epoch:
    for batch in batches:
      seen += _example_keys(batch["image"], batch["label"])
  assert seen == _source_keys(input_pipeline.get_source(config, "train"))


def test_each_epoch_is_a_new_permutation():
  config = _config(batch_size=20)  # 75 batches per epoch on one host.
  iterator = input_pipeline.create_train_iterator(
      config, process_index=0, process_count=1)
  epochs = [np.concatenate([b["label"] for b in _take(iterator, 75)])
            for _ in range(2)]
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(np.sort(epochs[0]), np.sort(epochs[1]))


def test_order_is_determined_by_seed():
  def first_batches(seed):
    return _take(input_pipeline.create_train_iterator(
        _config(seed=seed), process_index=1, process_count=2), 4)
  _assert_batches_equal(first_batches(0), first_batches(0))
  assert not np.array_equal(first_batches(0)[0]["image"],
                            first_batches(1)[0]["image"])


def test_iterator_state_round_trip():
  config = _config()
  make = functools.partial(input_pipeline.create_train_iterator, config,
                           process_index=0, process_count=2)
  iterator = make()
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected)


def test_iterator_resumes_through_an_orbax_checkpoint(tmp_path):
  config = _config()
  make = functools.partial(input_pipeline.create_train_iterator, config,
                           process_index=0, process_count=1)
  iterator = make()
  _take(iterator, 7)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(7, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 3)
  saved = tmp_path / "ckpt" / "7" / "data_iter" / "process_0-of-1.json"
  assert saved.exists()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(7, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(make())))
  _assert_batches_equal(_take(restored["data_iter"], 3), expected)


# ------------------------------------------------------- eval iterator ---


def test_eval_batches_are_padded_and_masked():
  config = _config()  # 297 test images, eval_batch_size 32 -> 10 batches.
  hosts = [list(input_pipeline.create_eval_iterator(
      config, "test", process_index=i, process_count=2)) for i in range(2)]
  assert [len(batches) for batches in hosts] == [10, 10]
  seen, real = collections.Counter(), 0
  for batches in hosts:
    for batch in batches:
      assert batch["image"].shape == (16, 8, 8, 1)
      assert batch["label"].shape == batch["mask"].shape == (16,)
      assert batch["mask"].dtype == np.float32
      is_real = batch["mask"] == 1
      assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
      assert not batch["image"][~is_real].any()  # padding is blank.
      real += int(batch["mask"].sum())
      seen += _example_keys(batch["image"][is_real], batch["label"][is_real])
  assert real == 297
  assert seen == _source_keys(input_pipeline.get_source(config, "test"))


def test_eval_num_batches_limits_every_host():
  for i in range(2):
    batches = list(input_pipeline.create_eval_iterator(
        _config(), "test", process_index=i, process_count=2, num_batches=2))
    assert len(batches) == 2
    assert all(b["mask"].sum() == 16 for b in batches)


def test_make_global_batch_on_8_devices():
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec("data"))
  local = next(input_pipeline.create_eval_iterator(
      _config(), "test", process_index=0, process_count=1))
  batch = input_pipeline.make_global_batch(local, sharding)
  assert batch["image"].shape == (32, 8, 8, 1)
  assert batch["label"].shape == batch["mask"].shape == (32,)
  for key, array in batch.items():
    assert array.sharding == sharding
    assert len(array.addressable_shards) == 8
    assert array.addressable_shards[0].data.shape[0] == 4
    np.testing.assert_array_equal(np.asarray(array), local[key])


# ------------------------------------------------------------------ TFDS ---


class FarmerPipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """A few variable-size RGB images with 3 classes, like imagenet2012."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(24, seed=0),
            "validation": self._generate_examples(6, seed=1)}

  def _generate_examples(self, num, seed):
    rng = np.random.default_rng(seed)
    for i in range(num):
      height, width = rng.integers(6, 40, size=2)
      image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      yield i, {"image": image, "label": i % 3}


class FarmerPipelineTestUnlabeled(FarmerPipelineTestImages):
  """Images only, like downsampled_imagenet/64x64."""

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3))})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _generate_examples(self, num, seed):
    for key, example in super()._generate_examples(num, seed):
      yield key, {"image": example["image"]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for builder_cls in (FarmerPipelineTestImages, FarmerPipelineTestUnlabeled):
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  return data_dir


def _tfds_config(data_dir, name="farmer_pipeline_test_images"):
  return _config(data__source="tfds", data__tfds_name=name,
                 data__tfds_data_dir=data_dir, data__eval_split="validation",
                 model__image_size=16, model__channels=3, batch_size=8,
                 eval_batch_size=4)


def test_tfds_variable_size_images_come_out_at_image_size(tfds_dir):
  config = _tfds_config(tfds_dir)
  batches = _take(input_pipeline.create_train_iterator(
      config, process_index=0, process_count=2), 7)  # wraps past one epoch.
  for batch in batches:
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["image"].dtype == np.uint8 and batch["image"].std() > 20
    assert set(batch["label"].tolist()) <= {0, 1, 2}
  evals = list(input_pipeline.create_eval_iterator(
      config, "validation", process_index=0, process_count=1))
  assert len(evals) == 2 and sum(b["mask"].sum() for b in evals) == 6


def test_tfds_without_label_is_unconditional(tfds_dir):
  """Unlabelled data feeds an unconditional model (label 0); a conditional
  model on it is an error, not class 0 for every image."""
  config = _tfds_config(tfds_dir, name="farmer_pipeline_test_unlabeled")
  with pytest.raises(ValueError, match="no 'label'|num_classes"):
    next(input_pipeline.create_train_iterator(
        config, process_index=0, process_count=1))
  config.model.num_classes = 0
  batch = next(input_pipeline.create_train_iterator(
      config, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(batch["label"], np.zeros(8, np.int32))


def test_tfds_errors_say_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match="tfds build imagenet2012"):
    input_pipeline.get_source(_tfds_config(str(tmp_path), "imagenet2012"),
                              "train")
  with pytest.raises(ValueError, match="config.data.tfds_name"):
    input_pipeline.get_source(_tfds_config(str(tmp_path), "no_such_dataset"),
                              "train")


def test_fit_image_center_crops_and_converts():
  image = np.zeros((10, 20, 3), np.uint8)
  image[:, 5:15] = (255, 0, 0)  # the central square is pure red.
  fitted = input_pipeline.fit_image(image, 5, 3)
  assert fitted.shape == (5, 5, 3)
  np.testing.assert_array_equal(fitted, np.broadcast_to([255, 0, 0], (5, 5, 3)))
  gray = input_pipeline.fit_image(image, 10, 1)
  assert gray.shape == (10, 10, 1)
  assert (gray == 76).all()  # ITU-R 601 luma of pure red, as PIL computes it.


# ---------------------------------------------------------------- folder ---


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _png_with_bad_pixels(rng):
  """A PNG with valid chunks and CRCs but garbage pixel data.

  PIL's verify() accepts it; only decoding the pixels fails.
  """
  buffer = io.BytesIO()
  Image.new("RGB", (12, 12)).save(buffer, format="PNG")
  png = buffer.getvalue()
  start = png.index(b"IDAT") - 4  # the chunk's 4-byte length comes first.
  length = int.from_bytes(png[start:start + 4], "big")
  data = rng.bytes(length)
  crc = zlib.crc32(b"IDAT" + data).to_bytes(4, "big")
  chunk = png[start:start + 8] + data + crc
  return png[:start] + chunk + png[start + 12 + length:]


def _make_folder(root, rng):
  """2 classes of 12x12 RGB PNGs plus one gray, one 20x30 and 2 broken files."""
  for name in ("cat", "dog"):
    for i in range(8):
      _write_png(os.path.join(root, name, f"{i}.png"),
                 rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
  _write_png(os.path.join(root, "dog", "gray.png"),
             rng.integers(0, 256, (12, 12), dtype=np.uint8))
  _write_png(os.path.join(root, "cat", "big.jpg"),
             rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
  with open(os.path.join(root, "cat", "corrupt.png"), "wb") as f:
    f.write(rng.bytes(300))
  with open(os.path.join(root, "dog", "bad_pixels.png"), "wb") as f:
    f.write(_png_with_bad_pixels(rng))
  with open(os.path.join(root, "dog", "notes.txt"), "w") as f:
    f.write("not an image")


def test_folder_source_skips_corrupt_and_fits_the_rest(tmp_path, caplog):
  _make_folder(str(tmp_path), np.random.default_rng(0))
  config = _config(data__source="folder", data__folder=str(tmp_path),
                   model__image_size=12, model__channels=3, batch_size=4)
  with caplog.at_level(logging.WARNING):
    sources = {split: input_pipeline.get_source(config, split)
               for split in ("train", "test")}
  skipped = [re.search(r"skipped (\d+) corrupt", r.getMessage())
             for r in caplog.records]
  assert sum(int(m.group(1)) for m in skipped if m) == 2  # over both splits.
  assert sum(len(s) for s in sources.values()) == 18  # 20 images - 2 broken.
  # 'test' holds 10% of the 20 listed files, before broken ones are dropped.
  assert 1 <= len(sources["test"]) <= 2
  examples = [s[i] for s in sources.values() for i in range(len(s))]
  for example in examples:
    assert example["image"].shape == (12, 12, 3)
  grays = [e for e in examples
           if (e["image"] == e["image"][..., :1]).all()]
  assert len(grays) == 1 and grays[0]["label"] == 1  # dog/gray.png.
  batches = _take(input_pipeline.create_train_iterator(
      config, process_index=0, process_count=1), 10)
  for batch in batches:
    assert batch["image"].shape == (4, 12, 12, 3)
    assert set(batch["label"].tolist()) <= {0, 1}


def test_folder_train_test_subfolders_and_errors(tmp_path):
  rng = np.random.default_rng(1)
  for split, count in (("train", 3), ("test", 2)):
    for name in ("a", "b"):
      for i in range(count):
        _write_png(str(tmp_path / "ok" / split / name / f"{i}.png"),
                   rng.integers(0, 256, (8, 8), dtype=np.uint8))
  config = _config(data__source="folder", data__folder=str(tmp_path / "ok"))
  assert len(input_pipeline.get_source(config, "train")) == 6
  labels = [int(e["label"]) for e in input_pipeline.get_source(config, "test")]
  assert sorted(labels) == [0, 0, 1, 1]
  (tmp_path / "bad" / "a").mkdir(parents=True)
  (tmp_path / "bad" / "a" / "x.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="no readable"):
    input_pipeline.get_source(
        _config(data__source="folder", data__folder=str(tmp_path / "bad")),
        "train")
  with pytest.raises(ValueError, match="config.data.folder"):
    input_pipeline.get_source(
        _config(data__source="folder", data__folder=str(tmp_path / "none")),
        "train")


def test_worker_processes_give_the_same_batches_and_resume():
  config = _config()
  expected = _take(input_pipeline.create_train_iterator(
      config, process_index=1, process_count=2), 6)
  config.data.worker_count = 2
  iterator = input_pipeline.create_train_iterator(
      config, process_index=1, process_count=2)
  _assert_batches_equal(_take(iterator, 3), expected[:3])
  state = json.loads(json.dumps(iterator.get_state()))
  iterator.close()
  resumed = input_pipeline.create_train_iterator(
      config, process_index=1, process_count=2)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected[3:])
  resumed.close()


def test_missing_labels_are_an_error_for_a_conditional_model():
  """Unlabelled examples get label 0 only for an unconditional model."""
  image = np.zeros((8, 8, 1), np.uint8)
  fit = functools.partial(input_pipeline._fit_example,  # pylint: disable=protected-access
                          image_size=8, channels=1)
  assert int(fit({"image": image}, conditional=False)["label"]) == 0
  assert int(fit({"image": image, "label": 7}, conditional=True)[
      "label"]) == 7
  with pytest.raises(ValueError, match="no 'label'.*num_classes"):
    fit({"image": image}, conditional=True)
