"""The flow decoders a CLI can pick: exact, block-wise Jacobi, student.

`inference.generate(run, ..., decoder=...)` takes None (the exact
sequential inverse, `Farmer.decode`) or `(decode_fn, variables)`. This
module makes them by name (`make_decoder`; `--decoder=exact|jacobi|student`
of `farmer_jax.sample` / `.evaluate`, default `config.sample.decoder`):

* 'jacobi': `JacobiDecoder`, the block-wise Jacobi inverse
  (`models/jacobi.py`) with its options from `config.sample`
  (`config_lib.JACOBI_KEYS`, resolved by `config_lib.jacobi_plan`;
  `--jacobi_chunk`, `--jacobi_tol`, `--jacobi_max_iters`,
  `--jacobi_block_chunks`, `--jacobi_block_max_iters` override them). It
  also returns each image's mean iterations per chunk per flow block, which
  `generate` summarises in its `stats`;
* 'student': the distilled one-step student (`inference.load_decoder`).
"""
import dataclasses
import sys
from typing import Optional

from absl import flags
from absl import logging
import ml_collections

from farmer_jax import config_lib
from farmer_jax import fileio
from farmer_jax import inference
from farmer_jax.models import Farmer
from farmer_jax.models import jacobi


# bfloat16's relative rounding step (2^-8): with bfloat16 activations, a
# Jacobi tolerance below it is met by luck, not by convergence.
BF16_RESOLUTION = 2.0 ** -8


@dataclasses.dataclass(frozen=True)
class JacobiDecoder:
  """`decode_fn` of the Jacobi decoder, hashable (a jit cache key).

  `decoder(variables, z, labels) -> (x, {'jacobi_iterations': [B, n]})`:
  images as `Farmer.decode` gives them and each image's mean Jacobi
  iterations per chunk in each flow block (block 0 nearest the data).
  """
  model: Farmer
  options: jacobi.JacobiOptions

  def __call__(self, variables, z, labels):
    x, iterations = self.model.apply(variables, z, labels, self.options,
                                     method=Farmer.decode_jacobi)
    return x, dict(jacobi_iterations=iterations)


def jacobi_options(config, **overrides) -> jacobi.JacobiOptions:
  """The Jacobi decoder's options from `config.sample`.

  Args:
    config: the run's config.
    **overrides: `config_lib.JACOBI_KEYS` values replacing the config's
      (`--jacobi_chunk`, ...); None leaves the config's.

  Raises:
    config_lib.ConfigError: a bad or unknown value (the key is named).
  """
  unknown = set(overrides) - set(config_lib.JACOBI_KEYS)
  if unknown:
    raise config_lib.ConfigError(
        f"Unknown Jacobi option(s) {sorted(unknown)}; known: "
        f"{list(config_lib.JACOBI_KEYS)}.")
  sample = ml_collections.ConfigDict(config.sample.to_dict())
  for key, value in overrides.items():
    if value is not None:
      sample[key] = value
  plan = config_lib.jacobi_plan(sample, config.model)
  if config.model.dtype == "bfloat16" and 0 < plan["tol"] < BF16_RESOLUTION:
    logging.warning(
        "jacobi_tol=%g is below the resolution of the model's bfloat16 "
        "activations (%.2g): rounding alone can keep a chunk's relative "
        "change above it, so chunks may run to jacobi_max_iters. Use "
        "--jacobi_tol=1e-2, or float32 activations.", plan["tol"],
        BF16_RESOLUTION)
  return jacobi.JacobiOptions(**plan)


def jacobi_decoder(run, **overrides):
  """`(decode_fn, variables)` of the Jacobi decoder for
  `inference.generate`.

  `overrides` as `jacobi_options`; `decode_fn.options` holds the resolved
  chunk sizes and limits per block.
  """
  return JacobiDecoder(run.model, jacobi_options(run.config, **overrides)), (
      run.variables)


def make_decoder(run, name: Optional[str] = None, *,
                 student_workdir: Optional[str] = None, **jacobi_overrides):
  """`inference.generate`'s `decoder` for a decoder named by the CLI.

  Args:
    run: a restored run.
    name: one of `config_lib.DECODERS`; None: `config.sample.decoder`, or
      'student' when `student_workdir` is given.
    student_workdir: the student's workdir (default `<workdir>/distill`).
    **jacobi_overrides: as `jacobi_options` (for 'jacobi').

  Returns:
    None for 'exact', else `(decode_fn, variables)`.

  Raises:
    config_lib.ConfigError: an unknown name, or a student workdir or Jacobi
      options given with another decoder.
  """
  if name is None:
    name = "student" if student_workdir else run.config.sample.get(
        "decoder", "exact")
  if name not in config_lib.DECODERS:
    raise config_lib.ConfigError(
        f"decoder {name!r} is not one of {config_lib.DECODERS}; set "
        "--decoder (or config.sample.decoder) to one of them.")
  if student_workdir and name != "student":
    raise config_lib.ConfigError(
        f"--student_workdir is given but the decoder is {name!r}; pass "
        "--decoder=student or drop --student_workdir.")
  given = sorted(k for k, v in jacobi_overrides.items() if v is not None)
  if given and name != "jacobi":
    raise config_lib.ConfigError(
        f"Jacobi options {given} are given but the decoder is {name!r}; "
        "pass --decoder=jacobi (or set config.sample.decoder) or drop them.")
  if name == "jacobi":
    return jacobi_decoder(run, **jacobi_overrides)
  if name == "student":
    return inference.load_decoder(student_workdir or str(
        fileio.path(run.workdir) / "distill"), run)
  return None


def _parse_block_pairs(values, flag: str):
  """`['0:1', '3:2']` (a list flag) -> `((0, 1), (3, 2))`; None stays."""
  if values is None:
    return None
  try:
    return tuple(tuple(int(v) for v in item.split(":", 1)) for item in values)
  except ValueError as e:
    raise config_lib.ConfigError(
        f"--{flag}={','.join(values)}: give block:value pairs, e.g. "
        f"--{flag}=0:1,1:2.") from e


def define_flags() -> None:
  """`--decoder`, `--student_workdir` and the Jacobi decoder's knobs."""
  main = dict(module_name=sys.argv[0])
  flags.DEFINE_enum(
      "decoder", None, list(config_lib.DECODERS), "Flow inverse: the exact "
      "sequential one, the block-wise Jacobi one (models/jacobi.py) or the "
      "distilled one-step student (farmer_jax.distill). Default: "
      "config.sample.decoder ('student' if --student_workdir is given).",
      **main)
  flags.DEFINE_string("student_workdir", None, "The distillation run's "
                      "--workdir (default: <workdir>/distill).", **main)
  flags.DEFINE_integer("jacobi_chunk", None, "Jacobi: tokens per chunk, a "
                       "divisor of N (0: the whole sequence). Default: "
                       "config.sample.jacobi_chunk.", **main)
  flags.DEFINE_float("jacobi_tol", None, "Jacobi: a chunk stops when its "
                     "relative change is below this. Default: "
                     "config.sample.jacobi_tol.", **main)
  flags.DEFINE_integer("jacobi_max_iters", None, "Jacobi: iterations per "
                       "chunk at most (0: the chunk size, exact). Default: "
                       "config.sample.jacobi_max_iters.", **main)
  flags.DEFINE_list("jacobi_block_chunks", None, "Jacobi: per-block chunk "
                    "sizes, block:chunk pairs (block 0 nearest the data), "
                    "e.g. 0:1. Default: config.sample.jacobi_block_chunks.",
                    **main)
  flags.DEFINE_list("jacobi_block_max_iters", None, "Jacobi: per-block "
                    "limits, block:max_iters pairs. Default: config.sample."
                    "jacobi_block_max_iters.", **main)


def jacobi_flags() -> dict:
  """The Jacobi options set on the command line (`define_flags`)."""
  values = {key: flags.FLAGS[key].value for key in config_lib.JACOBI_KEYS}
  for key in ("jacobi_block_chunks", "jacobi_block_max_iters"):
    values[key] = _parse_block_pairs(values[key], key)
  return {k: v for k, v in values.items() if v is not None}
