"""One path type for every file a run writes or reads: local or `gs://`.

Runs, evaluation, sampling, scoring, distillation, diagnosis and the
notebook read and write their files through `etils.epath.Path`, which
speaks local paths and `gs://` (through `tf.io.gfile`, or fsspec + gcsfs
where TensorFlow is absent). A plain `open` / `os.makedirs` on a
`gs://bucket/run` string would instead make a local folder named `gs:`, and
a run's `config.json` would then be missing on every other machine. Orbax
checkpoints and the TensorBoard writer of a `gs://` workdir (CLU's; see
writers.py) speak `gs://` themselves.

Whole files are written from memory (`write_bytes`): PNGs and `.npz` are
encoded into a buffer first, since object stores take whole objects.
"""
import io
import json
import os
from typing import Any, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike]


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path`: local, or a URI such as `gs://bucket/dir`."""
  return epath.Path(p)


def is_remote(p: PathLike) -> bool:
  """True for a URI (`gs://...`), which `os.path` functions would mangle."""
  return "://" in os.fspath(p)


def absolute(p: PathLike) -> str:
  """`p` as an absolute path string; a URI is absolute already."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def size(p: PathLike) -> int:
  """Bytes in the file `p`."""
  if is_remote(p):
    return path(p).stat().length
  # epath's local stat also looks up the owner's name, which fails for a uid
  # with no passwd entry (common in containers).
  return os.path.getsize(p)


def write_bytes(p: PathLike, data: bytes, *, atomic: bool = False
                ) -> epath.Path:
  """Writes `data` to `p`, creating its parent folders first.

  Args:
    p: the file.
    data: its whole contents.
    atomic: readers never see a half-written file. Locally: write
      `<p>.tmp`, then rename it onto `p`. A bucket needs no rename (it
      would be a copy): an object appears only once its upload completes.

  Returns:
    `p` as an `epath.Path`.
  """
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if not atomic or is_remote(p):
    p.write_bytes(data)
    return p
  tmp = p.with_name(p.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(p)
  return p


def write_text(p: PathLike, text: str, *, atomic: bool = False
               ) -> epath.Path:
  """Writes `text` (UTF-8) to `p`; see `write_bytes`."""
  return write_bytes(p, text.encode("utf-8"), atomic=atomic)


def read_text(p: PathLike) -> str:
  return path(p).read_bytes().decode("utf-8")


def write_json(p: PathLike, value: Any, *, indent: int = 2,
               atomic: bool = False) -> epath.Path:
  """`value` as indented JSON at `p`; see `write_bytes`."""
  return write_text(p, json.dumps(value, indent=indent), atomic=atomic)


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def save_npz(p: PathLike, *, compressed: bool = False, atomic: bool = False,
             **arrays) -> epath.Path:
  """`np.savez` (or `savez_compressed`) of `arrays` at `p`, name as given."""
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  return write_bytes(p, buffer.getvalue(), atomic=atomic)


def load_npz(p: PathLike) -> dict[str, np.ndarray]:
  """The arrays of the `.npz` at `p` (pickled objects refused)."""
  with np.load(io.BytesIO(path(p).read_bytes())) as f:
    return {k: f[k] for k in f.files}
