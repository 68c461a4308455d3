"""A trained run, restored for sampling, evaluation and scoring.

`train_and_evaluate` writes `<workdir>/config.json` next to its checkpoints;
`restore(workdir)` reads it back, builds the same mesh and model, restores
the latest (or a chosen) checkpoint onto its shardings and hands back the
EMA parameters. The CLIs (`farmer_jax.sample`, `.evaluate`, `.score`) and
the notebook start here.

`generate` is the sharded, jitted sampler of a run: labels are padded to a
multiple of the batch shards, split over the mesh's batch axes, and the
samples come back as uint8 on the host. Its options are every
`sampling.SamplingOptions` field, from `config.sample` unless overridden
(`sampling_kwargs`); `define_sampling_flags` gives a CLI one flag per option.
"""
import dataclasses
import functools
import json
import numbers
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from farmer_jax import config_lib
from farmer_jax import evaluation
from farmer_jax import sampling
from farmer_jax import sharding
from farmer_jax.models import Farmer

CONFIG_FILE = "config.json"


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config as JSON (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))  # never half-written


def _tuples(value):
  """JSON lists back to the tuples configs use (configs hold no lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} holds no training run (it is "
        "written when `python -m farmer_jax.main` starts). Pass the run's "
        "--workdir, or --config=configs/<name>.py for a run made before "
        "config.json existed.")
  with open(path) as f:
    raw = json.load(f)
  for section, defaults in config_lib.ADDED_KEYS.items():
    node = raw.setdefault(section, {}) if section else raw
    for key, value in defaults.items():
      node.setdefault(key, value(node) if callable(value) else value)
  return ml_collections.ConfigDict(_tuples(raw))


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


def fit_mesh(config, num_devices: int) -> ml_collections.ConfigDict:
  """`config`, with a data-parallel mesh if its own does not fit here.

  A run trained on a pod slice is evaluated on a laptop or in Colab: the
  checkpoint restores onto any mesh (Orbax reshards), so only the mesh shape
  has to change.
  """
  try:
    config_lib.resolve_mesh_shape(config.mesh_shape, num_devices)
    return config
  except config_lib.ConfigError:
    logging.warning("mesh_shape %s does not fit %d device(s); using a "
                    "data-parallel mesh (-1, 1, 1) instead.",
                    tuple(config.mesh_shape), num_devices)
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh_shape = (-1, 1, 1)
    return config


def restore(workdir: str, step: Optional[int] = None,
            config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Restores the EMA parameters of the run in `workdir`.

  Args:
    workdir: the training run's --workdir.
    step: checkpoint step; None = the latest.
    config: overrides `<workdir>/config.json` (e.g. another mesh_shape).

  Returns:
    A `Run`.
  """
  from farmer_jax import train  # pylint: disable=g-import-not-at-top
  config = load_config(workdir) if config is None else config
  config = fit_mesh(config, jax.device_count())
  trainer = train.Trainer(config, workdir)
  try:
    state = trainer.checkpointer.restore_state(step, trainer.abstract_state)
  finally:
    trainer.checkpointer.close()
  logging.info("Restored %s at step %d (EMA parameters).", workdir,
               int(state.step))
  return Run(config, trainer.model, {"params": state.ema_params},
             int(state.step), trainer.mesh, workdir)


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
def _sampler(model, batch_sharding, denoise_sigma, decode_fn, kw):
  """One jitted sampler per (model, options); jit caches by shape."""
  fn = functools.partial(sampling.sample_images, model,
                         denoise_sigma=denoise_sigma, decode_fn=decode_fn,
                         **dict(kw))

  def sample(params, decoder_variables, rng, labels):
    return sampling.to_uint8(fn(params, rng, labels,
                                decoder_variables=decoder_variables))

  return jax.jit(sample, in_shardings=(None, None, None, batch_sharding),
                 out_shardings=batch_sharding)


def generate(run: Run, labels: Sequence[int], seed: int, *,
             batch_size: int = 0, decoder=None, denoise: bool = False,
             progress: bool = False, **kwargs) -> np.ndarray:
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
      hashable (e.g. the distilled student's decode, farmer_jax.distill).
    denoise: one Tweedie step with sigma = config.noise_min (spec 6.3).
    progress: log each batch with images/s.
    **kwargs: overrides of `config.sample` (cfg_scale, guidance, ...).
  """
  labels = np.asarray(labels, np.int32)
  per_call = batch_size or len(labels)
  per_call = -(-per_call // run.batch_shards) * run.batch_shards
  kw = sampling_kwargs(run.config.sample, **kwargs)
  sigma = float(run.config.noise_min) if denoise else 0.0
  decode_fn, decoder_variables = decoder or (None, None)
  fn = _sampler(run.model, run.batch_sharding, sigma, decode_fn,
                tuple(sorted(kw.items())))
  rng = jax.random.PRNGKey(seed)
  out = []
  for i, start in enumerate(range(0, len(labels), per_call)):
    t0 = time.time()
    chunk = labels[start:start + per_call]
    padded = np.resize(chunk, per_call) if len(chunk) < per_call else chunk
    with sharding.context(run.mesh, run.config):
      images = fn(run.variables, decoder_variables,
                  jax.random.fold_in(rng, i),
                  # Every host holds all labels and supplies its shards
                  # (also right when the mesh spans several hosts).
                  jax.make_array_from_callback(
                      padded.shape, run.batch_sharding,
                      lambda index, a=padded: a[index]))
    out.append(evaluation.to_host(images)[:len(chunk)])  # all hosts
    if progress:
      done = start + len(chunk)
      logging.info("sampled %d / %d (%.2f images/s)", done, len(labels),
                   len(chunk) / (time.time() - t0))
  return np.concatenate(out)
