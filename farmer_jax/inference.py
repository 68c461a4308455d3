"""A trained run, restored for sampling, evaluation and scoring.

`train_and_evaluate` writes `<workdir>/config.json` next to its checkpoints;
`restore(workdir)` reads it back, builds the model and a mesh (the caller's,
the run's own `mesh_shape`, or `--mesh`), and reads only the EMA parameters
of the latest (or a chosen) checkpoint onto their shardings: an Orbax
partial restore that never builds an optimizer (`checkpointing.
restore_params`). No training module is imported here. The CLIs
(`farmer_jax.sample`, `.evaluate`, `.score`, `.diagnose`), the distillation
teacher and the notebook start here.

`generate` is the sharded, jitted sampler of a run: labels are padded to a
multiple of the batch shards, split over the mesh's batch axes, and the
samples come back as uint8 on the host. Its options are every
`sampling.SamplingOptions` field, from `config.sample` unless overridden
(`sampling_kwargs`); `define_sampling_flags` gives a CLI one flag per option.
Its decoder is the exact flow inverse, the distilled student
(`load_decoder`) or another `(decode_fn, variables)`: `farmer_jax.decoders`
adds the block-wise Jacobi inverse and picks one by name (`--decoder`).
"""
import dataclasses
import functools
import numbers
import sys
import time
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from farmer_jax import checkpointing
from farmer_jax import config_lib
from farmer_jax import metrics
from farmer_jax import nll
from farmer_jax import sampling
from farmer_jax import sharding
from farmer_jax.models import Farmer
from farmer_jax.models import init_params
from farmer_jax.models import layers
from farmer_jax.models import unpatchify
from farmer_jax.models.student import StudentDecoder

# config.json of a run (kept here too: the notebook and scripts use these).
CONFIG_FILE = checkpointing.CONFIG_FILE
load_config = checkpointing.load_config
save_config = checkpointing.save_config


class MeshMismatchError(config_lib.ConfigError):
  """The run's mesh does not fit the devices here; `--mesh` overrides it."""


@dataclasses.dataclass
class Run:
  """A restored run: config, model, EMA variables, step and mesh."""
  config: ml_collections.ConfigDict
  model: Farmer
  variables: Any  # {'params': EMA params}, sharded on `mesh`
  step: int
  mesh: jax.sharding.Mesh
  workdir: str

  @property
  def batch_sharding(self):
    return sharding.batch_sharding(self.mesh, self.config)

  @property
  def batch_shards(self) -> int:
    """How many ways the batch axis is split (samples per call divide by)."""
    spec = self.batch_sharding.spec
    axes = spec[0] if spec and spec[0] is not None else ()
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([self.mesh.shape[a] for a in axes]))


def parse_mesh(text: Optional[str]) -> Optional[tuple]:
  """`'-1,1,1'` (a `--mesh` flag) -> `(-1, 1, 1)`; None or '' -> None."""
  if not text:
    return None
  try:
    return tuple(int(v) for v in str(text).split(","))
  except ValueError as e:
    raise MeshMismatchError(
        f"--mesh={text}: give three comma-separated sizes (data, fsdp, "
        "tensor), one of them may be -1, e.g. --mesh=-1,1,1.") from e


def create_mesh(config, workdir: str = "",
                mesh_shape: Optional[Sequence[int]] = None):
  """`(config, mesh)`: the run's mesh, or `mesh_shape` (`--mesh`) instead.

  Orbax reshards a checkpoint onto any mesh, so a run trained on a pod
  slice restores on one host once the mesh shape says how; this never
  picks one silently (a run trained with FSDP restored replicated could
  run out of memory far from the cause).

  Raises:
    MeshMismatchError: the mesh does not fit the devices here; the message
      names the mesh and the `--mesh` override.
  """
  if mesh_shape is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh_shape = tuple(int(v) for v in mesh_shape)
  n = jax.device_count()
  try:
    config_lib.resolve_mesh_shape(config.mesh_shape, n)
  except config_lib.ConfigError as e:
    source = ("--mesh" if mesh_shape is not None else
              f"the run's config.mesh_shape ({workdir or 'config'})")
    raise MeshMismatchError(
        f"mesh_shape {tuple(config.mesh_shape)} (data, fsdp, tensor) from "
        f"{source} does not fit the {n} device(s) here: {e} Pass --mesh="
        f"-1,1,1 (data parallel, parameters replicated) or e.g. "
        f"--mesh=1,{n},1 (FSDP) to the CLI, or mesh_shape= to "
        "inference.restore.") from e
  return config, sharding.create_mesh(config)


def abstract_params(model: Farmer, config, mesh):
  """The model's params as ShapeDtypeStructs with shardings (restore target).

  Structure-agnostic: whatever tree `model.init` makes is the target.
  """
  rng = jax.random.PRNGKey(0)
  abstract, _ = sharding.abstract_and_shardings(
      lambda: init_params(model, {"params": rng, "dropout": rng}), mesh,
      config)
  return abstract


def restore(workdir: str, step: Optional[int] = None,
            config: Optional[ml_collections.ConfigDict] = None, *,
            mesh: Optional[jax.sharding.Mesh] = None,
            mesh_shape: Optional[Sequence[int]] = None,
            matmul_precision: Optional[str] = None) -> Run:
  """Restores the EMA parameters (only) of the run in `workdir`.

  Args:
    workdir: the training run's --workdir.
    step: checkpoint step; None = the latest.
    config: overrides `<workdir>/config.json` (its `model` section must be
      the checkpoint's: checked).
    mesh: restore onto this mesh (e.g. a distillation run's); else one is
      built from `mesh_shape` or the config's `mesh_shape`.
    mesh_shape: `(data, fsdp, tensor)` replacing the run's (`--mesh`).
    matmul_precision: replaces `config.model.matmul_precision`
      (`--matmul_precision`), e.g. 'highest' for float32 matmuls on a GPU
      or TPU where the run trained with 'default'.

  Returns:
    A `Run`.

  Raises:
    MeshMismatchError: the mesh does not fit the devices here.
  """
  config = load_config(workdir) if config is None else config
  if matmul_precision:
    if matmul_precision not in layers.MATMUL_PRECISIONS:
      raise config_lib.ConfigError(
          f"--matmul_precision={matmul_precision!r}: use one of "
          f"{layers.MATMUL_PRECISIONS}.")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.matmul_precision = matmul_precision
  if mesh is None:
    config, mesh = create_mesh(config, workdir, mesh_shape)
  model = Farmer(config.model)
  target = abstract_params(model, config, mesh)
  ckpt = checkpointing.Checkpointer(workdir, config, read_only=True)
  try:
    params, step = ckpt.restore_params(step, target)
  finally:
    ckpt.close()
  logging.info("Restored %s at step %d (EMA parameters only).", workdir, step)
  return Run(config, model, {"params": params}, int(step), mesh, workdir)


# --- The distilled one-step student (spec 8; trained by farmer_jax.distill).


def create_student(model_config) -> StudentDecoder:
  """The student for `config.model` (the teacher's model config)."""
  cfg = ml_collections.FrozenConfigDict(model_config)
  return StudentDecoder(cfg, (cfg.image_size // cfg.patch_size) ** 2,
                        cfg.patch_size ** 2 * cfg.channels)


def student_decode(student: StudentDecoder, student_params, z, labels):
  """One-step decoder: latents -> images, like `Farmer.decode`.

  Args:
    student: from `create_student` / `load_student`.
    student_params: the student's params (no `{'params': ...}` wrapper).
    z: `[B, N, d]` latents in the AR prior's token order.
    labels: `[B]` int (used only if `af_class_cond`).

  Returns:
    `[B, H, W, C]` float32 images in `[-1, 1]` units, not clipped.
  """
  tokens = student.apply({"params": student_params}, z, labels)
  s = student.cfg.image_size
  return unpatchify(tokens, student.cfg.patch_size, s, s)


def student_init(student: StudentDecoder, rng):
  """The student's boxed params (`nn.LogicallyPartitioned`), traced only."""
  z = jnp.zeros((1, student.num_tokens, student.token_dim))
  return student.init({"params": rng}, z, jnp.zeros((1,), jnp.int32))[
      "params"]


def load_student(config, workdir: str, step: Optional[int] = None,
                 mesh=None):
  """The trained student of `workdir` (its EMA params), for sampling.

  Args:
    config: a config with the teacher's `model` section (the distillation
      config, or the teacher's own).
    workdir: the student's workdir (`--workdir` of the distillation run).
    step: checkpoint step; the latest if None.
    mesh: restore onto this mesh; default: one from `config.mesh_shape`.

  Returns:
    `(student, params)` for `student_decode(student, params, z, labels)`.
  """
  student = create_student(config.model)
  if mesh is None:
    config, mesh = create_mesh(config, workdir)
  target, _ = sharding.abstract_and_shardings(
      lambda: student_init(student, jax.random.PRNGKey(0)), mesh, config)
  ckpt = checkpointing.Checkpointer(workdir, config, read_only=True)
  try:
    params, _ = ckpt.restore_params(step, target, key=(
        "ema_params" if ckpt.has_field(step, "ema_params") else "params"))
  finally:
    ckpt.close()
  return student, params


def load_decoder(workdir: str, run):
  """The student as `farmer_jax.sample --decoder=student` uses it.

  Args:
    workdir: the student's workdir.
    run: anything with the teacher's `config` (e.g. `inference.Run`; its
      `mesh`, if any, is used).

  Returns:
    `(decode_fn, params)`, `decode_fn(params, z, labels) -> x` as
    `student_decode`.
  """
  student, params = load_student(run.config, workdir,
                                 mesh=getattr(run, "mesh", None))
  return functools.partial(student_decode, student), params


# --- Sampling options and the sharded sampler.


def _as_field_type(field: dataclasses.Field, value):
  """Config / JSON numbers as the option's type (ints stay ints)."""
  if field.type is float and isinstance(value, numbers.Real):
    return float(value)
  if field.type is int and isinstance(value, numbers.Real) and value == int(
      value):
    return int(value)
  return value  # anything else: `SamplingOptions` says what is wrong.


def sampling_kwargs(sample_config, **overrides) -> dict:
  """Every `sampling.SamplingOptions` field from `config.sample`.

  Args:
    sample_config: `config.sample`.
    **overrides: options that replace the config's; None leaves the
      config's value (an unset CLI flag).

  Returns:
    `{field: value}` for `sampling.sample_images`, already checked by
    `SamplingOptions` (a bad value fails here, before anything compiles).

  Raises:
    ValueError: an unknown option or a bad value.
  """
  fields = dataclasses.fields(sampling.SamplingOptions)
  unknown = set(overrides) - {f.name for f in fields}
  if unknown:
    raise ValueError(f"Unknown sampling option(s) {sorted(unknown)}; known: "
                     f"{[f.name for f in fields]}.")
  kw = {}
  for f in fields:
    value = overrides.get(f.name)
    kw[f.name] = _as_field_type(
        f, sample_config[f.name] if value is None else value)
  sampling.SamplingOptions(**kw)
  return kw


def define_restore_flags() -> None:
  """`--mesh=data,fsdp,tensor` and `--matmul_precision` (`restore`)."""
  flags.DEFINE_string(
      "mesh", None, "Mesh shape data,fsdp,tensor to restore onto (one may be "
      "-1), e.g. -1,1,1 (data parallel) or 1,-1,1 (FSDP). Default: the run's "
      "config.mesh_shape, which must fit the devices here.",
      module_name=sys.argv[0])
  flags.DEFINE_string(
      "matmul_precision", None, "Replaces the run's config.model."
      "matmul_precision (default, high, highest): 'highest' gives float32 "
      "matmuls on a GPU / TPU (exact bits/dim and inverse) for a run that "
      "trained with 'default'.", module_name=sys.argv[0])


def define_sampling_flags() -> None:
  """One CLI flag per `SamplingOptions` field; None: `config.sample`'s.

  Called by a program's `define_flags`; the flags are filed under the main
  module (absl keys it by `sys.argv[0]`) so that its `--help` lists them.
  """
  main = dict(module_name=sys.argv[0])
  for f in dataclasses.fields(sampling.SamplingOptions):
    text = f"{f.metadata['help']} Default: config.sample.{f.name}."
    if f.metadata["choices"]:
      flags.DEFINE_enum(f.name, None, list(f.metadata["choices"]), text,
                        **main)
    elif f.type is int:
      flags.DEFINE_integer(f.name, None, text, **main)
    elif f.type is float:
      flags.DEFINE_float(f.name, None, text, **main)
    else:
      flags.DEFINE_string(f.name, None, text, **main)


def sampling_flags() -> dict:
  """The sampling options set on the command line (`define_sampling_flags`)."""
  values = {f.name: flags.FLAGS[f.name].value
            for f in dataclasses.fields(sampling.SamplingOptions)}
  return {k: v for k, v in values.items() if v is not None}


@functools.lru_cache(maxsize=16)
def _sampler(model, batch_sharding, denoise_sigma, decode_fn, static_kw):
  """One jitted sampler per (model, static options); jit caches by shape.

  Its last argument holds the traced options (`sampling.split_traceable`):
  a sweep over guidance weights or temperatures reuses one executable.
  """
  fn = functools.partial(sampling.sample_images, model,
                         denoise_sigma=denoise_sigma, decode_fn=decode_fn,
                         **dict(static_kw))

  def sample(params, decoder_variables, rng, labels, traced_kw):
    images, fallbacks, stats = fn(params, rng, labels, return_fallbacks=True,
                                  return_decode_stats=True,
                                  decoder_variables=decoder_variables,
                                  **traced_kw)
    return nll.to_uint8(images), dict(fallbacks=fallbacks, **stats)

  return jax.jit(sample, in_shardings=(None, None, None, batch_sharding, None),
                 out_shardings=(batch_sharding, batch_sharding))


def sampler(model, batch_sharding, kw: dict, denoise_sigma: float = 0.0,
            decode_fn=None):
  """`(jitted sampler, its traced options)` for `sampling_kwargs` `kw`.

  The sampler is `fn(variables, decoder_variables, rng, labels, traced) ->
  (uint8 images, per-image stats)`, the stats a dict of batch-sharded
  arrays: `fallbacks` `[B]` and the decoder's own (`jacobi_iterations`
  `[B, af_blocks]`); options that differ only in `traced` values share it
  (and its compiled executables).
  """
  static_kw, traced_kw = sampling.split_traceable(kw)
  return _sampler(model, batch_sharding, denoise_sigma, decode_fn,
                  tuple(sorted(static_kw.items()))), traced_kw


def _jacobi_stats(iterations: np.ndarray, decode_fn) -> dict:
  """Per-block summaries of `[num_images, af_blocks]` iterations per chunk."""
  options = getattr(decode_fn, "options", None)
  return dict(
      jacobi_iterations_per_chunk=[round(float(v), 4)
                                   for v in iterations.mean(0)],
      jacobi_max_iterations_per_chunk=[round(float(v), 4)
                                       for v in iterations.max(0)],
      jacobi_chunks=list(options.chunks) if options else None,
      jacobi_max_iters=list(options.max_iters) if options else None)


def generate(run: Run, labels: Sequence[int], seed: int, *,
             batch_size: int = 0, decoder=None, denoise: bool = False,
             progress: bool = False, stats: Optional[dict] = None,
             **kwargs) -> np.ndarray:
  """Class-conditional samples as uint8 `[len(labels), H, W, C]`.

  Args:
    run: a restored run.
    labels: one class per sample (any value for unconditional models).
    seed: samples are a deterministic function of `(seed, labels, options)`
      for a fixed batch size; batch `i` uses `fold_in(PRNGKey(seed), i)`.
    batch_size: samples per jitted call (0 = all at once); rounded up to a
      multiple of the mesh's batch shards.
    decoder: None for the exact flow inverse, or `(decode_fn,
      decoder_variables)` with `decode_fn(decoder_variables, z, labels) -> x`
      hashable (e.g. the distilled student's decode, farmer_jax.distill;
      `decoders.make_decoder`), or `-> (x, stats)`
      (`decoders.JacobiDecoder`).
    denoise: one Tweedie step with sigma = config.noise_min (spec 6.3).
    progress: log each batch with images/s.
    stats: if a dict, `guidance_fallbacks` (guided draws, one per latent
      dimension, that fell back to `p_c`: 'rejection' with no accepted try,
      'closed_form' on an improper target) and `guidance_fallback_fraction`
      (of all `len(labels) * N * d` latent dimensions) are added to it;
      with the Jacobi decoder also `jacobi_iterations_per_chunk` (per flow
      block, block 0 first: the mean over images of their mean iterations
      per chunk), `jacobi_max_iterations_per_chunk` (the largest image's)
      and `jacobi_chunks`, `jacobi_max_iters` (the options per block).
    **kwargs: overrides of `config.sample` (cfg_scale, guidance, ...).
  """
  labels = np.asarray(labels, np.int32)
  per_call = batch_size or len(labels)
  per_call = -(-per_call // run.batch_shards) * run.batch_shards
  kw = sampling_kwargs(run.config.sample, **kwargs)
  decode_fn, decoder_variables = decoder or (None, None)
  sigma = float(run.config.noise_min) if denoise else 0.0
  fn, traced_kw = sampler(run.model, run.batch_sharding, kw, sigma, decode_fn)
  rng = jax.random.PRNGKey(seed)
  out, fallbacks, iterations = [], 0, []
  for i, start in enumerate(range(0, len(labels), per_call)):
    t0 = time.time()
    chunk = labels[start:start + per_call]
    padded = np.resize(chunk, per_call) if len(chunk) < per_call else chunk
    with sharding.context(run.mesh, run.config):
      images, aux = fn(run.variables, decoder_variables,
                       jax.random.fold_in(rng, i),
                       # Every host holds all labels and supplies its shards
                       # (also right when the mesh spans several hosts).
                       jax.make_array_from_callback(
                           padded.shape, run.batch_sharding,
                           lambda index, a=padded: a[index]), traced_kw)
    images, aux = metrics.to_host((images, aux))  # all hosts
    out.append(images[:len(chunk)])
    fallbacks += int(aux["fallbacks"][:len(chunk)].sum())
    if "jacobi_iterations" in aux:
      iterations.append(aux["jacobi_iterations"][:len(chunk)])
    if progress:
      done = start + len(chunk)
      logging.info("sampled %d / %d (%.2f images/s)", done, len(labels),
                   len(chunk) / (time.time() - t0))
  jacobi_stats = {}
  if iterations:
    jacobi_stats = _jacobi_stats(np.concatenate(iterations), decode_fn)
    logging.info("Jacobi iterations per chunk, per flow block (block 0 "
                 "nearest the data): mean %s, max %s; chunks %s, limits %s",
                 *jacobi_stats.values())
  if stats is not None:
    dims = len(labels) * run.model.num_tokens * run.model.token_dim
    stats.update(guidance_fallbacks=fallbacks,
                 guidance_fallback_fraction=fallbacks / max(dims, 1),
                 **jacobi_stats)
    if fallbacks:
      logging.warning("%d of %d latent dimensions fell back to p_c (guidance "
                      "%s had no sample of its target there).", fallbacks,
                      dims, kw["guidance"])
  return np.concatenate(out)
