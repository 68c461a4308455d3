"""Config helpers: argument parsing, start-up validation, derived values.

* `parse_arg` turns a config's `arg` string ('res=64,size=B,runlocal') into
  typed fields, so every `configs/*.py` reads its variants the same way.
* `validate` checks a whole config against the device count before anything
  is built; each `ConfigError` names the field and says how to fix it.
* `resolve_mesh_shape` fills in the one -1 of `config.mesh_shape`.
* `check_workdir` fails early when --workdir (local or gs://) cannot be
  written.
* `derived` computes the values that follow from the config (batch per host
  and device, tokens, token dim) so the trainer logs them once.
* `flatten` turns a config into flat scalars for hyperparameter logging.
"""
import math
import numbers
import os
from typing import Any, Iterable, Optional, Sequence
import uuid

import ml_collections

from farmer_jax import fileio
from farmer_jax.models import layers

MESH_AXES = ("data", "fsdp", "tensor")
PRIORS = ("farmer", "gaussian")
REDUNDANT_PRIORS = ("shared", "token")  # the paper's shared Z^R mixture | ours
DTYPES = ("float32", "bfloat16")
# jax.nn.dot_product_attention's implementations ('cudnn': GPU only).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
# The remat policy names (a bool is also accepted: True = 'full').
REMAT_CHOICES = (False, True) + tuple(layers.REMAT_POLICIES)
NOISE_SCHEDULES = ("cosine", "constant", "uniform")
SOURCES = ("mnist", "digits", "tfds", "folder")
GUIDANCE_RULES = ("resample", "rejection", "closed_form", "none")
# Log-weights of resampling CFG (spec 7): the paper's Algorithm 1 | ours.
PROPOSALS = ("paper", "balance")
# The flow inverse of `farmer_jax.sample` / `.evaluate`: sequential and
# exact | block-wise Jacobi (models/jacobi.py) | the distilled student.
DECODERS = ("exact", "jacobi", "student")
# `config.sample` keys of the Jacobi decoder (`jacobi_plan`).
JACOBI_KEYS = ("jacobi_chunk", "jacobi_tol", "jacobi_max_iters",
               "jacobi_block_chunks", "jacobi_block_max_iters")
# Model keys that say how the matmuls run, not which function the
# parameters define: a run may resume, be restored or be distilled with
# another value (`checkpointing.Checkpointer.check_config` skips them), e.g.
# float32 matmuls to evaluate a run trained with TF32 ones.
RUNTIME_MODEL_KEYS = ("matmul_precision",)
# Keys (and whole sections) added to the config ("": the top level) after
# some runs were trained, with the values those runs used (their config.json
# and checkpoints lack them; a callable gets the section and returns it):
# `inference.load_config` and the checkpoint's model-config check fill them.
ADDED_KEYS = {
    # Runs without these keys: the shared Z^R mixture, scanned loops, XLA
    # attention, default precision; remat may be a bool (True = 'full').
    "model": dict(redundant_prior="shared", scan_layers=True, attention="xla",
                  matmul_precision="default"),
    # FID / IS: off for runs whose config has no inception section.
    "inception": dict(weights="", num_real=-1, reference_split="",
                      batch_size=100),
    # Bayes accuracy off; decay on every weight; the LR decays to 0; one batch
    # per step.
    "": dict(eval_bayes_images=0, weight_decay_mask=False, lr_end=0.0,
             grad_accum_steps=1),
    # Resampling CFG without the paper's Algorithm 1 (spec 7): balance-heuristic
    # weights on the sampling temperatures, one candidate count for z^I, z^R.
    "sample": dict(proposal="balance",
                   weigh_logit_temp=lambda sample: sample["logit_temp"],
                   weigh_scale_temp=lambda sample: sample["scale_temp"],
                   resample_temp=1.0,
                   r_num_candidates=lambda sample: sample["num_candidates"],
                   r_num_uncond_candidates=(
                       lambda sample: sample["num_uncond_candidates"]),
                   r_var_scale=1.0,
                   # The exact inverse; the Jacobi decoder's defaults (0: the
                   # whole sequence as one chunk, at most chunk iterations).
                   decoder="exact", jacobi_chunk=0, jacobi_tol=1e-3,
                   jacobi_max_iters=0, jacobi_block_chunks=(),
                   jacobi_block_max_iters=()),
}
CHANNELS = (1, 3)  # what input_pipeline.fit_image can produce.
# The embedded datasets have 10 digit classes and only 'train' / 'test';
# 'folder' has the same two splits (see input_pipeline).
_EMBEDDED_NUM_CLASSES = 10
_FIXED_SPLITS = ("train", "test")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and fix."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


# ------------------------------------------------------------ arg parsing ---


def _parse_value(key: str, text: Optional[str], default: Any) -> Any:
  """Converts `text` to the type of `default`; a bare key means True."""
  if isinstance(default, bool):
    if text is None or text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"arg {key}={text!r}: expected true or false.")
  if text is None:
    raise ValueError(f"arg {key!r} needs a value, e.g. {key}={default!r}.")
  try:
    return type(default)(text)
  except ValueError as e:
    raise ValueError(f"arg {key}={text!r}: expected a "
                     f"{type(default).__name__}.") from e


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses a config arg 'a=1,b=x,flag' against typed defaults.

  Args:
    arg: comma-separated `key=value` or bare `key` (a bool set to True).
    **defaults: every allowed key with its default; the default's type
      (bool, int, float, str) is the type of the value.

  Returns:
    A ConfigDict with every key of `defaults`, updated from `arg`.

  Raises:
    ValueError: an unknown key or a value of the wrong type.
  """
  values = dict(defaults)
  for item in filter(None, (s.strip() for s in arg.split(","))):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config arg {key!r} in {arg!r}; known: "
                       f"{', '.join(sorted(defaults))}.")
    values[key] = _parse_value(key, text.strip() if sep else None,
                               defaults[key])
  return ml_collections.ConfigDict(values)


# ------------------------------------------------------------------ mesh ---


def resolve_mesh_shape(mesh_shape: Sequence[int],
                       num_devices: int) -> tuple[int, int, int]:
  """`(data, fsdp, tensor)` with its one -1 filled in from `num_devices`.

  Args:
    mesh_shape: three sizes, at most one of them -1.
    num_devices: devices the mesh must cover exactly.

  Raises:
    ConfigError: wrong length, several -1, or sizes that do not multiply to
      `num_devices`.
  """
  shape = tuple(int(s) for s in mesh_shape)
  _require(len(shape) == len(MESH_AXES),
           f"config.mesh_shape={shape} must have 3 entries, one per mesh axis "
           f"{MESH_AXES}, e.g. (-1, 1, 1) for data parallelism.")
  _require(shape.count(-1) <= 1 and all(s >= 1 or s == -1 for s in shape),
           f"config.mesh_shape={shape}: sizes must be >= 1 with at most one "
           "-1 (the axis that takes the remaining devices).")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    _require(num_devices % known == 0,
             f"mesh {shape} needs a multiple of {known} devices but "
             f"{num_devices} are available; change config.mesh_shape.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  _require(math.prod(shape) == num_devices,
           f"mesh {shape} needs {math.prod(shape)} devices but {num_devices} "
           "are available; change config.mesh_shape (one entry may be -1).")
  return shape


def _as_axes(target) -> tuple[str, ...]:
  """A rule's target (None, 'fsdp' or ('data', 'fsdp')) as a tuple."""
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def _mesh_axes_of(config, logical: str) -> tuple[str, ...]:
  """The mesh axes that `logical` maps to in config.logical_axis_rules."""
  for name, target in config.logical_axis_rules:
    if name == logical:
      return _as_axes(target)
  return ()  # no rule: replicated.


def _mesh_size(shape: tuple[int, ...], axes: Iterable[str]) -> int:
  sizes = dict(zip(MESH_AXES, shape))
  return math.prod(sizes[a] for a in axes)


# ------------------------------------------------------------ validation ---

# (field under config, lowest allowed value, why) for integer-like fields.
_AT_LEAST = (
    ("model.image_size", 1, "the image side in pixels"),
    ("model.patch_size", 1, "the patch side in pixels"),
    ("model.num_classes", 0, "0 means unconditional"),
    ("model.af_blocks", 1, "the flow needs at least one block"),
    ("model.af_layers_per_block", 1, "each flow block needs a transformer"),
    ("model.af_width", 1, "the transformer width"),
    ("model.af_heads", 1, "attention needs a head"),
    ("model.ar_layers", 1, "the prior needs a transformer"),
    ("model.ar_width", 1, "the transformer width"),
    ("model.ar_heads", 1, "attention needs a head"),
    ("model.mlp_ratio", 1, "the MLP width is mlp_ratio * width"),
    ("model.K_I", 1, "a mixture needs a component"),
    ("model.K_R", 1, "a mixture needs a component"),
    ("model.num_cond_tokens", 1,
     "the first mixture is read from the last cond token"),
    ("noise_min", 0, "a noise std"),
    ("noise_max", 0, "a noise std"),
    ("total_steps", 1, "training needs a step"),
    ("grad_accum_steps", 1, "1 means one batch per step"),
    ("lr_end", 0, "the learning rate the cosine ends at"),
    ("warmup_steps", 0, "0 means no warm-up"),
    ("weight_decay", 0, "0 means none"),
    ("max_consecutive_nonfinite", 1, "1 stops at the first non-finite step"),
    ("log_every", 1, "a period in steps"),
    ("eval_every", 1, "a period in steps"),
    ("ckpt_every", 1, "a period in steps"),
    ("keep_ckpts", 1, "the latest checkpoint must be kept to resume"),
    ("num_grid_images", 1, "the image grid needs an image"),
    ("data.worker_count", 0, "0 reads in-process"),
    ("sample.cfg_scale", 0, "0 means no guidance"),
    ("sample.num_candidates", 1, "resampling needs a candidate"),
    ("sample.num_uncond_candidates", 0, "0 means candidates from p_c only"),
    ("sample.r_num_candidates", 1, "resampling z^R needs a candidate"),
    ("sample.r_num_uncond_candidates", 0,
     "0 means z^R candidates from p_c only"),
    ("sample.r_var_scale", 0, "0 gives z^R's component means"),
    ("sample.num_grid_images", 0, "0 means no sample grid"),
    ("sample.num_eval_samples", 0, "0 means no sample-quality metrics"),
    ("eval_bayes_images", 0, "0 means no Bayes-rule classification"),
    ("classifier.steps", 0, "0 means no sample-quality classifier"),
    ("classifier.batch_size", 1, "a batch needs an image"),
    ("inception.batch_size", 1, "a batch needs an image"),
)
_POSITIVE = ("lr", "grad_clip", "model.scale_clip", "model.head_init_std",
             "model.scale_floor", "sample.logit_temp", "sample.scale_temp",
             "sample.weigh_logit_temp", "sample.weigh_scale_temp",
             "sample.resample_temp", "classifier.lr")
# Fields in [0, 1) with a typical value: a probability that must leave some
# labels, and decay rates.
_UNIT_INTERVAL = (("model.label_drop", 0.1), ("ema_decay", 0.999),
                  ("b1", 0.9), ("b2", 0.95))
_CHOICES = (
    ("model.prior", PRIORS),
    ("model.redundant_prior", REDUNDANT_PRIORS),
    ("model.dtype", DTYPES),
    ("model.attention", ATTENTION_IMPLEMENTATIONS),
    ("model.matmul_precision", layers.MATMUL_PRECISIONS),
    ("model.remat", REMAT_CHOICES),
    ("model.channels", CHANNELS),
    ("noise_schedule", NOISE_SCHEDULES),
    ("data.source", SOURCES),
    ("sample.guidance", GUIDANCE_RULES),
    ("sample.proposal", PROPOSALS),
    ("sample.decoder", DECODERS),
)


def _get(config, field: str):
  for name in field.split("."):
    config = config[name]
  return config


def _check_scalars(config) -> None:
  """The table-driven range and choice checks above."""
  for field, low, why in _AT_LEAST:
    value = _get(config, field)
    _require(value >= low, f"config.{field}={value!r} must be >= {low} "
             f"({why}); set config.{field} to {low} or more.")
  for field in _POSITIVE:
    value = _get(config, field)
    _require(value > 0, f"config.{field}={value!r} must be > 0; set "
             f"config.{field} to a positive value.")
  for field, typical in _UNIT_INTERVAL:
    value = _get(config, field)
    _require(0 <= value < 1, f"config.{field}={value!r} must be in [0, 1); "
             f"set config.{field} to a value in [0, 1), e.g. {typical}.")
  for field, choices in _CHOICES:
    value = _get(config, field)
    _require(value in choices, f"config.{field}={value!r} is not one of "
             f"{choices}; set config.{field} to one of them.")


def _check_inception(inc) -> None:
  """FID / IS settings, so a bad path fails at start-up, not at evaluation."""
  _require(inc.num_real == -1 or inc.num_real >= 2,
           f"config.inception.num_real={inc.num_real!r}: FID needs at least 2 "
           "real images; set it to -1 (the whole split) or >= 2.")
  _require(not inc.weights or fileio.path(inc.weights).is_file(),
           f"config.inception.weights={inc.weights!r} is not a file; make it "
           "with `python -m farmer_jax.inception --out=PATH` or set it to '' "
           "(no FID / IS).")


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n) if n % k == 0]


def _check_model(model) -> None:
  """Shapes that must fit together: patches, channel split, heads."""
  _require(model.image_size % model.patch_size == 0,
           f"config.model.patch_size={model.patch_size} does not divide "
           f"config.model.image_size={model.image_size}; pick a divisor of "
           f"{model.image_size} {tuple(_divisors(model.image_size))}.")
  d = model.patch_size ** 2 * model.channels
  _require(1 <= model.d_I <= d,
           f"config.model.d_I={model.d_I} is outside [1, d] where d = "
           f"patch_size**2 * channels = {d} is the token dim; set "
           f"config.model.d_I in 1..{d} (the paper: 128 of 768).")
  # Measured on an H200 (benchmarks/accelerator_check.py): cuDNN's fused
  # attention refuses float32 ("Q must be fp16/bf16/fp8...") at trace time.
  _require(model.attention != "cudnn" or model.dtype == "bfloat16",
           f"config.model.attention='cudnn' needs config.model.dtype="
           f"'bfloat16' (cuDNN's fused attention takes no float32); got "
           f"{model.dtype!r}. Use attention='xla' for float32.")
  for part in ("af", "ar"):
    width, heads = model[f"{part}_width"], model[f"{part}_heads"]
    _require(width % heads == 0,
             f"config.model.{part}_width={width} is not divisible by "
             f"config.model.{part}_heads={heads}; pick {part}_heads from "
             f"{tuple(_divisors(width)) + (width,)} or change {part}_width.")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _block_overrides(sample, key: str, num_blocks: int, check) -> dict:
  """`config.sample.<key>`, pairs `(block, value)`, as `{block: value}`."""
  pairs = sample[key]
  _require(isinstance(pairs, (tuple, list)),
           f"config.sample.{key}={pairs!r} must be a tuple of (block, value) "
           "pairs, e.g. ((0, 1),); () for none.")
  out = {}
  for pair in pairs:
    _require(isinstance(pair, (tuple, list)) and len(pair) == 2
             and all(_is_int(v) for v in pair),
             f"config.sample.{key} entry {pair!r} must be a pair of integers "
             "(block, value), e.g. (0, 1).")
    t, value = pair
    _require(0 <= t < num_blocks,
             f"config.sample.{key} names block {t}, but the flow's blocks "
             f"are 0..{num_blocks - 1} (config.model.af_blocks={num_blocks}; "
             "block 0 is the one nearest the data); name one of them.")
    _require(t not in out, f"config.sample.{key} names block {t} twice; "
             "keep one entry.")
    check(f"config.sample.{key} entry ({t}, {value})", value)
    out[t] = value
  return out


def check_jacobi(sample, model) -> None:
  """The Jacobi decoder's `config.sample` keys (`JACOBI_KEYS`) fit the model.

  Raises:
    ConfigError: naming the key (and its flag) and the fix.
  """
  n = (model.image_size // model.patch_size) ** 2
  row = model.image_size // model.patch_size
  chunks = tuple(_divisors(n)) + (n,)

  def check_chunk(what, value, zero_ok=False):
    _require(_is_int(value) and (value >= 1 or zero_ok and value == 0),
             f"{what}: a chunk size must be an integer >= 1"
             + (" (0: the whole sequence)" if zero_ok else "") + ".")
    _require(value == 0 or n % value == 0,
             f"{what}: chunk {value} does not divide the N = {n} tokens of a "
             f"flow block ((image_size // patch_size)**2); pick one of "
             f"{chunks}" + (f", or 0 (the whole sequence, {n}); one row of "
                            f"patches is {row}" if zero_ok else "") + ".")

  def check_iters(what, value):
    _require(_is_int(value) and value >= 0,
             f"{what}: an iteration limit must be an integer >= 0 (0: the "
             "chunk size, which is exact).")

  check_chunk("config.sample.jacobi_chunk (--jacobi_chunk)",
              sample.jacobi_chunk, zero_ok=True)
  tol = sample.jacobi_tol
  _require(isinstance(tol, numbers.Real) and not isinstance(tol, bool)
           and math.isfinite(tol) and tol >= 0,
           f"config.sample.jacobi_tol (--jacobi_tol)={tol!r} must be a finite "
           "number >= 0 (0: always run jacobi_max_iters), e.g. 1e-3.")
  check_iters("config.sample.jacobi_max_iters (--jacobi_max_iters)",
              sample.jacobi_max_iters)
  _block_overrides(sample, "jacobi_block_chunks", model.af_blocks,
                   check_chunk)
  _block_overrides(sample, "jacobi_block_max_iters", model.af_blocks,
                   check_iters)


def jacobi_plan(sample, model) -> dict:
  """`config.sample`'s Jacobi keys resolved per flow block, after checking.

  `jacobi_chunk = 0` is the whole sequence (`(image_size // patch_size)**2`
  tokens); `jacobi_block_chunks` / `jacobi_block_max_iters` replace the
  chunk / limit of the blocks they name; a limit of 0, or above the chunk,
  is the chunk size (that many iterations are exact).

  Returns:
    `{chunks, max_iters, tol}`, one chunk and limit per block (block 0
    nearest the data): the fields of `models.jacobi.JacobiOptions`.
  """
  check_jacobi(sample, model)
  chunk = sample.jacobi_chunk or (model.image_size // model.patch_size) ** 2
  block_chunks = _block_overrides(sample, "jacobi_block_chunks",
                                  model.af_blocks, lambda *_: None)
  block_iters = _block_overrides(sample, "jacobi_block_max_iters",
                                 model.af_blocks, lambda *_: None)
  chunks = tuple(int(block_chunks.get(t, chunk))
                 for t in range(model.af_blocks))
  limits = tuple(int(block_iters.get(t, sample.jacobi_max_iters))
                 for t in range(model.af_blocks))
  max_iters = tuple(min(m, c) if m else c for m, c in zip(limits, chunks))
  return dict(chunks=chunks, max_iters=max_iters,
              tol=float(sample.jacobi_tol))


def _check_noise(config) -> None:
  _require(config.noise_min <= config.noise_max,
           f"config.noise_min={config.noise_min} is above config.noise_max="
           f"{config.noise_max}; the schedule anneals noise_max -> noise_min, "
           "so set noise_min <= noise_max (the paper: 0.1 -> 0.005).")


def _check_schedule(config) -> None:
  _require(config.lr_end <= config.lr,
           f"config.lr_end={config.lr_end} is above config.lr={config.lr}; "
           "the cosine decays lr -> lr_end, so set lr_end <= lr (the paper: "
           "1e-4 -> 1e-6).")
  _require(config.warmup_steps < config.total_steps,
           f"config.warmup_steps={config.warmup_steps} must be < "
           f"config.total_steps={config.total_steps}; lower warmup_steps "
           "or raise total_steps.")
  steps = config.debug_nonfinite_steps
  ok = isinstance(steps, (tuple, list)) and all(
      isinstance(s, int) and 1 <= s <= config.total_steps for s in steps)
  _require(ok, f"config.debug_nonfinite_steps={steps!r} must be a tuple of "
           f"training steps in 1..{config.total_steps} (a test switch: their "
           "batches become NaN); leave it () for a real run.")


def _check_splits(data) -> None:
  for field in ("train_split", "eval_split"):
    split = data[field]
    _require(bool(split), f"config.data.{field} is empty; name a split, "
             "e.g. 'train' or 'test'.")
    if data.source in ("mnist", "digits", "folder"):
      _require(split in _FIXED_SPLITS,
               f"config.data.{field}={split!r} does not exist for "
               f"config.data.source={data.source!r}; use one of "
               f"{_FIXED_SPLITS}.")


def _check_data(config) -> None:
  """The source has what it needs; embedded sets have 10 classes."""
  data, model = config.data, config.model
  if data.source == "tfds":
    _require(bool(data.tfds_name), "config.data.source='tfds' needs "
             "config.data.tfds_name, e.g. 'imagenet2012'.")
  if data.source == "folder":
    _require(bool(data.folder), "config.data.source='folder' needs "
             "config.data.folder, a directory with one sub-folder per class.")
  if data.source in ("mnist", "digits"):
    # image_size and channels are free: the pipeline resizes and converts.
    classes = _EMBEDDED_NUM_CLASSES
    _require(model.num_classes in (0,) or model.num_classes >= classes,
             f"config.model.num_classes={model.num_classes} but "
             f"config.data.source={data.source!r} has {classes} classes; set "
             f"config.model.num_classes={classes} (or 0: unconditional).")
  _check_splits(data)


def _check_rules(config) -> None:
  """Rules are `(logical name, None | mesh axis | tuple of mesh axes)`."""
  seen = set()
  for rule in config.logical_axis_rules:
    _require(len(rule) == 2, f"config.logical_axis_rules entry {rule!r} must "
             "be a pair (logical axis, mesh axes).")
    name, target = rule
    _require(name not in seen, f"config.logical_axis_rules names {name!r} "
             "twice; keep one entry (the first one would win).")
    seen.add(name)
    axes = _as_axes(target)
    bad = [a for a in axes if a not in MESH_AXES]
    _require(not bad, f"config.logical_axis_rules maps {name!r} to {bad}, "
             f"which are not mesh axes; use None or names from {MESH_AXES}.")
    _require(len(set(axes)) == len(axes), f"config.logical_axis_rules maps "
             f"{name!r} to {axes}, naming a mesh axis twice; name it once.")


def _check_batch(config, field: str, shape, process_count: int) -> None:
  """A global batch splits evenly over batch devices and over hosts."""
  value = config[field]
  axes = _mesh_axes_of(config, "batch")
  shards = _mesh_size(shape, axes)
  step = math.lcm(shards, process_count)
  suggestion = max(step, value + (-value) % step)
  _require(value > 0, f"config.{field}={value} must be > 0; set "
           f"config.{field} to a multiple of {step}, e.g. {step}.")
  _require(value % shards == 0,
           f"config.{field}={value} does not split over the {shards} devices "
           f"of mesh axes {axes} ('batch' in config.logical_axis_rules); set "
           f"config.{field} to a multiple of {shards}, e.g. {suggestion} "
           f"({suggestion // shards} per device).")
  _require(value % process_count == 0,
           f"config.{field}={value} is not divisible by process_count="
           f"{process_count}; set config.{field} to a multiple of "
           f"{process_count}, e.g. {suggestion}.")


def _check_accumulation(config, shape) -> None:
  """Each of the grad_accum_steps microbatches splits over the batch devices."""
  accum = config.grad_accum_steps
  shards = _mesh_size(shape, _mesh_axes_of(config, "batch"))
  per_device = config.batch_size // shards
  ok = [k for k in range(1, per_device + 1) if per_device % k == 0]
  _require(per_device % accum == 0,
           f"config.grad_accum_steps={accum} does not divide the per-device "
           f"batch {per_device} (config.batch_size={config.batch_size} over "
           f"{shards} devices), so the microbatches would not split evenly "
           f"over the devices; pick grad_accum_steps from {tuple(ok)} or "
           "change config.batch_size.")


def _logical_sizes(model) -> dict[str, list[tuple[str, int]]]:
  """Sizes of parameter axes by logical name, each with how to change it."""
  n = (model.image_size // model.patch_size) ** 2
  d = model.patch_size ** 2 * model.channels
  parts = ("af", "ar") if model.prior == "farmer" else ("af",)
  sizes = {"embed": [], "mlp": [], "heads": [], "kv": [], "length": [
      ("tokens N = (config.model.image_size // patch_size)**2", n)]}
  for p in parts:
    width, heads = model[f"{p}_width"], model[f"{p}_heads"]
    sizes["embed"].append((f"config.model.{p}_width", width))
    sizes["mlp"].append((f"config.model.mlp_ratio * {p}_width",
                         model.mlp_ratio * width))
    sizes["heads"].append((f"config.model.{p}_heads", heads))
    sizes["kv"].append((f"config.model.{p}_width // {p}_heads",
                        width // heads))
  sizes["blocks"] = [("config.model.af_blocks", model.af_blocks)]
  sizes["layers"] = [("config.model.af_layers_per_block",
                      model.af_layers_per_block)]
  if model.prior == "farmer":
    sizes["layers"].append(("config.model.ar_layers", model.ar_layers))
    sizes["length"].append(("config.model.num_cond_tokens + N + 1",
                            model.num_cond_tokens + n + 1))
    sizes["vocab"] = [("config.model.num_classes + 1", model.num_classes + 1)]
    sizes["mixture"] = [("config.model.K_I * (1 + 2 * d_I)",
                         model.K_I * (1 + 2 * model.d_I))]
    if d > model.d_I:
      sizes["mixture"].append(("config.model.K_R * (1 + 2 * d_R)",
                               model.K_R * (1 + 2 * (d - model.d_I))))
  return sizes


def _check_sharded_sizes(config, shape) -> None:
  """Every parameter axis divides by the mesh axes its logical name maps to."""
  for logical, entries in _logical_sizes(config.model).items():
    axes = _mesh_axes_of(config, logical)
    shards = _mesh_size(shape, axes)
    for what, size in entries:
      _require(size % shards == 0,
               f"{what} = {size} is not divisible by {shards}, the size of "
               f"mesh axes {axes} that logical axis {logical!r} maps to in "
               f"config.logical_axis_rules (mesh {shape}); make it a multiple "
               f"of {shards} or shrink those axes in config.mesh_shape.")


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int) -> None:
  """Checks that `config` can train on `num_devices` over `process_count` hosts.

  Args:
    config: a full training config (the keys of configs/digits.py).
    num_devices: jax.device_count(), all devices of all hosts.
    process_count: jax.process_count().

  Raises:
    ConfigError: the first problem found; the message names the field and
      says how to fix it.
  """
  _check_scalars(config)
  _check_inception(config.inception)
  _check_model(config.model)
  check_jacobi(config.sample, config.model)
  _check_noise(config)
  _check_schedule(config)
  _check_data(config)
  _require(config.num_eval_batches == -1 or config.num_eval_batches >= 1,
           f"config.num_eval_batches={config.num_eval_batches}; use -1 (the "
           "whole split) or a positive number of batches.")
  shape = resolve_mesh_shape(config.mesh_shape, num_devices)
  _check_rules(config)
  for field in ("batch_size", "eval_batch_size"):
    _check_batch(config, field, shape, process_count)
  _check_accumulation(config, shape)
  _require(config.num_grid_images <= config.eval_batch_size,
           f"config.num_grid_images={config.num_grid_images} is more than one "
           f"eval batch (config.eval_batch_size={config.eval_batch_size}); "
           "lower num_grid_images or raise eval_batch_size.")
  _check_sharded_sizes(config, shape)


# --------------------------------------------------------------- workdir ---


def check_workdir(workdir: str) -> None:
  """Fails early if --workdir cannot be created or written.

  A local path is checked without writing anything: its nearest existing
  ancestor must be a directory this user may write. A remote one (gs://...)
  cannot be checked that way, so it is created and a probe file is written
  to it and removed: the bucket must exist and this machine's credentials
  must allow writes.

  Raises:
    ConfigError: naming --workdir and the fix.
  """
  _require(bool(workdir), "--workdir is empty; pass a directory to write "
           "checkpoints and logs to.")
  if fileio.is_remote(workdir):
    _check_remote_workdir(workdir)
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  _require(os.path.isdir(existing),
           f"--workdir={workdir}: {existing} is a file, so the directory "
           "cannot be created; choose another --workdir.")
  _require(os.access(existing, os.W_OK | os.X_OK),
           f"--workdir={workdir}: {existing} is not writable by this user; "
           "choose a writable --workdir or fix the directory's permissions.")


def _check_remote_workdir(workdir: str) -> None:
  """Creates `workdir` and writes and removes a probe file in it."""
  path = fileio.path(workdir)
  # One name per call: every process of a pod probes at once.
  probe = path / f".write_check_{uuid.uuid4().hex}"
  try:
    _require(not path.exists() or path.is_dir(),
             f"--workdir={workdir} is a file, so the directory cannot be "
             "created; choose another --workdir.")
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # gfile, fsspec, ...
    raise ConfigError(
        f"--workdir={workdir} cannot be written ({type(e).__name__}: {e}); "
        "check that the bucket exists and that this machine's account may "
        f"create objects in it (`gcloud storage ls {workdir}`; role Storage "
        "Object Admin), or choose another --workdir.") from e


# --------------------------------------------------------------- derived ---


def derived(config: ml_collections.ConfigDict, *, process_count: int,
            num_devices: Optional[int] = None) -> dict[str, Any]:
  """Values that follow from the config, for logging once at start-up.

  Args:
    config: a validated config.
    process_count: jax.process_count().
    num_devices: all devices; default jax.device_count().

  Returns:
    A dict: mesh shape, per-host and per-device batch, tokens N, token dim
    d, d_I / d_R, total training images seen.
  """
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top  # keeps configs light.
    num_devices = jax.device_count()
  shape = resolve_mesh_shape(config.mesh_shape, num_devices)
  model = config.model
  d = model.patch_size ** 2 * model.channels
  batch_shards = _mesh_size(shape, _mesh_axes_of(config, "batch"))
  return dict(
      mesh_shape=shape,
      per_host_batch=config.batch_size // process_count,
      per_device_batch=config.batch_size // batch_shards,
      num_tokens=(model.image_size // model.patch_size) ** 2,
      token_dim=d,
      d_I=model.d_I,
      d_R=d - model.d_I,
      total_images_seen=config.total_steps * config.batch_size,
  )


def num_dims(config: ml_collections.ConfigDict) -> int:
  """Dimensions D of one image (`bits/dim` divides by it)."""
  return config.model.image_size ** 2 * config.model.channels


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`{'model.af_width': 128, ...}`; non-scalars become strings (hparams)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    elif isinstance(value, (bool, int, float, str)):
      out[key] = value
    else:
      out[key] = str(value)
  return out
