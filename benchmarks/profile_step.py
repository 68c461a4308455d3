r"""Where the time goes: the train step and the exact inverse, by op kind.

For each configuration (`bench_lib.REFERENCE`'s refS / refM, the rows of
the side-by-side with TARFlow's PyTorch code, and 'digits', the
README default) and prior, the jitted train step (state donated) and the
jitted exact inverse `Farmer.decode` (batch `--inverse_batch`) are compiled,
warmed up and run `--steps` times under `jax.profiler`. The trace's XLA op
events (one per executed HLO instruction, per thread) are summed by
instruction name and grouped into kinds from the compiled HLO (opcode,
fused computation, `op_name` metadata):

  matmul            dot / fusions that contain a dot (incl. YNNPACK ones)
  attention softmax non-dot ops under an `attn` module (mask, max, exp, sum)
  mixture           mixture head split and log-density (`prior.log_prob`)
  layer norm        ops under a LayerNorm / norm module
  mlp activation    non-dot ops under an `mlp` module (GELU)
  optimizer/EMA     ops outside the model (AdamW, EMA, guard, RNG, metrics)
  copies            copy / transpose / reverse (incl. their fusions)
  scan buffers      dynamic-update-slice / dynamic-slice and broadcast fills
                    of stacked scan carries and outputs
  other             the rest of the model's elementwise work

Each cell is the kind's share of the summed op time; 'ms/step' is wall time
of the timed steps outside the profiler. With 2 threads, ops on both run
concurrently, so summed op time can exceed wall time.

  python benchmarks/profile_step.py --configs=refS,refM,digits \
      --priors=gaussian,farmer
"""
import collections
import functools
import glob
import re
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

import bench_lib
from farmer_jax.models import Farmer

_CONFIGS = flags.DEFINE_list("configs", ["refS", "refM", "digits"],
                             "refS, refM (bench_lib.REFERENCE) or digits.")
_PRIORS = flags.DEFINE_list("priors", ["gaussian", "farmer"], "Priors.")
_STEPS = flags.DEFINE_integer("steps", 3, "Profiled (and timed) calls.")
_INVERSE_BATCH = flags.DEFINE_integer("inverse_batch", 16,
                                      "Batch of the profiled inverse.")
_WHAT = flags.DEFINE_list("what", ["train", "inverse"], "train, inverse.")
_OVERRIDES = flags.DEFINE_list(
    "overrides", [], "Config overrides KEY=VALUE (Python literals), applied "
    "to every row, e.g. model.remat=full.")

KINDS = ("matmul", "attention softmax", "mixture", "layer norm",
         "mlp activation", "optimizer/EMA", "copies", "scan buffers", "other")
_SKIP = {"while", "call", "conditional", "tuple", "get-tuple-element",
         "parameter", "constant", "bitcast", "after-all"}


def parse_hlo(text: str) -> dict:
  """HLO text -> {instruction name: (opcode, op_name, contains_dot)}."""
  fused_dot = {}  # computation name -> contains a dot/convolution
  current = None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      fused_dot[current] = False
    elif current and re.search(r"= [^=]*\b(dot|convolution)\(", line):
      fused_dot[current] = True
  info = {}
  for line in text.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
    if not m:
      continue
    name, rest = m.groups()
    if rest.startswith("("):  # a tuple type: skip to its closing paren
      depth = 0
      for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          rest = rest[i + 1:]
          break
    op = re.match(r"\s*\S*?\s*([a-z][\w\-]*)\(", rest)
    opcode = op.group(1) if op else "?"
    op_name = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    has_dot = opcode in ("dot", "convolution") or bool(
        calls and fused_dot.get(calls.group(1)))
    info[name] = (opcode, op_name.group(1) if op_name else "", has_dot)
  return info


def kind_of(name: str, opcode: str, op_name: str, has_dot: bool) -> str:
  if opcode in _SKIP:
    return ""
  if (opcode in ("copy", "transpose", "reverse") or name.startswith(
      ("copy", "transpose", "reverse"))):
    return "copies"
  if (opcode in ("dynamic-update-slice", "dynamic-slice", "broadcast") or
      "dynamic-update-slice" in name or "dynamic-slice" in name or
      name.startswith("wrapped_broadcast")):
    return "scan buffers"
  if has_dot:
    return "matmul"
  if "/attn/" in op_name or op_name.startswith("attn/"):
    return "attention softmax"
  if "_mixture" in op_name or re.search(r"prior\.log_prob/[^/]*$", op_name) \
      or "mixture_log_prob" in op_name:
    return "mixture"
  if "LayerNorm" in op_name or re.search(r"(^|/)norm(_R)?/", op_name):
    return "layer norm"
  if re.search(r"(^|/)mlp(_R)?/", op_name):
    return "mlp activation"
  if "Farmer" not in op_name and not op_name.startswith("layers/"):
    return "optimizer/EMA"
  return "other"


def profile(fn, args, steps: int, hlo_text: str):
  """Runs `fn(*args)` `steps` times traced; returns ({kind: ns}, s/call)."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    path = glob.glob(f"{logdir}/plugins/profile/*/*.xplane.pb")[0]
    data = ProfileData.from_file(path)
  info = parse_hlo(hlo_text)
  per_kind = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if event.name in info:
          kind = kind_of(event.name, *info[event.name])
          if kind:
            per_kind[kind] += event.duration_ns
  return per_kind, seconds


def train_row(config, steps: int):
  step, mesh, init_fn, _, batch, _ = bench_lib.train_step_parts(config)
  with bench_lib.sharding.context(mesh, config):
    state = init_fn()
    compiled = step.lower(state, batch).compile()
    holder = [state]

    def run(batch):
      holder[0], metrics = compiled(holder[0], batch)
      return metrics
    return profile(run, (batch,), steps, compiled.as_text())


def inverse_row(config, batch: int, steps: int):
  model = Farmer(config.model)
  s, c = config.model.image_size, config.model.channels
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, s, s, c)),
                               jnp.zeros((1,), jnp.int32))
  z = jax.random.normal(jax.random.PRNGKey(1),
                        (batch, model.num_tokens, model.token_dim))
  labels = jnp.zeros((batch,), jnp.int32)
  decode = jax.jit(functools.partial(model.apply, method=Farmer.decode))
  compiled = decode.lower(params, z, labels).compile()
  return profile(compiled, (params, z, labels), steps, compiled.as_text())


def main(argv):
  del argv
  rows = []
  for name in _CONFIGS.value:
    for prior in _PRIORS.value:
      config = bench_lib.reference_config(name, prior)
      bench_lib.apply_overrides(config, _OVERRIDES.value)
      for what in _WHAT.value:
        if what == "train":
          per_kind, seconds = train_row(config, _STEPS.value)
          batch = config.batch_size
        else:
          batch = _INVERSE_BATCH.value
          per_kind, seconds = inverse_row(config, batch, _STEPS.value)
        total = sum(per_kind.values()) or 1
        rows.append([name, prior, what, batch, seconds * 1e3, batch / seconds]
                    + [f"{100 * per_kind[k] / total:.0f}%" for k in KINDS])
  print(f"Device: {bench_lib.device_name()}")
  print(bench_lib.table(["config", "prior", "step", "batch", "ms/step",
                         "images/s"] + list(KINDS), rows))


if __name__ == "__main__":
  app.run(main)
