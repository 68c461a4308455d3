"""Smoke test: every benchmark script runs with its smallest flags.

Each script runs in a subprocess on one CPU device with XLA's cheapest
backend settings, its optimisations off and a shared persistent compilation
cache (the train step of throughput and memory is the same program), and
must print a markdown table with the expected rows and positive numbers.
"""
import os
import re
import subprocess
import sys

import pytest

import helpers

SMALLEST = {
    "train_throughput.py": (["--sizes=XS", "--batch_size=8", "--steps=1",
                             "--warmup=0", "--matmul_n=256"], ["XS"]),
    "compile_time.py": (["--depths=1", "--size=XS", "--batch_size=8"], ["1"]),
    "sampling_speed.py": (["--batch_sizes=2", "--size=XS", "--repeats=1"],
                          ["AR decoding (latents)", "flow inverse"]),
    "memory.py": (["--batch_sizes=8", "--size=XS"], ["8"]),
    "inception_speed.py": (["--batch_sizes=1", "--image_size=8",
                            "--repeats=1"], ["1"]),
    "profile_step.py": (["--configs=refS", "--priors=farmer", "--steps=1",
                         "--inverse_batch=2"], ["refS", "refS"]),
    "accelerator_check.py": (["--rows=tiny", "--batch=2",
                              "--inverse_batch=2"], ["tiny"]),
    # With remat on, so the hardware FLOPs exceed the model FLOPs.
    "mfu.py": (["--config=configs/imagenet.py:res=64,size=tiny",
                "--config.model.remat=True", "--config.batch_size=8",
                "--steps=2", "--warmup=1", "--matmul_n=256"],
               ["64px p4 AF 2x1x64 AR 2x64"]),
    # The PyTorch reference flow (torch is a test dependency).
    # One thread: torch's two threads stall each other beside the other
    # xdist worker (27 s instead of 7 s).
    "torch_reference.py": (["--rows=refS", "--steps=1", "--warmup=0",
                            "--inverse_batch=2", "--inverse_repeats=1",
                            "--threads=1"], ["refS"]),
}
TEXT_COLUMNS = ("prior", "step", "mode", "torch version", "dtype", "remat",
                "attention")  # not numbers
# profile_step.py's shares of op time by kind: a kind may take 0%.
SHARE_COLUMNS = ("attention softmax", "mixture", "layer norm",
                 "mlp activation", "optimizer/EMA", "copies", "scan buffers",
                 "other")


def _table(stdout: str) -> list[dict]:
  """The rows of the markdown table in `stdout`, as {header: cell}."""
  lines = [l for l in stdout.splitlines() if l.startswith("|")]
  assert len(lines) >= 3 and set(lines[1]) <= set("|-"), stdout
  cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
  return [dict(zip(cells[0], row)) for row in cells[2:]]


def _number(cell: str):
  """'1.2M', '3.4x', '5%', '1,234', '2e-05' -> float; None if no number."""
  match = re.fullmatch(r"([0-9.]+(?:e[-+]?\d+)?)[Mx%]?", cell.replace(",", ""))
  return float(match.group(1)) if match else None


def _smoke_env(tmp_path_factory) -> dict:
  """A benchmark subprocess's environment: one CPU device, a shared compile
  cache, and FAST_COMPILE too (the numbers of a smoke run mean nothing:
  profile_step and memory.py take 28 and 22 s instead of 63 and 67 s)."""
  cache = tmp_path_factory.getbasetemp() / "benchmarks_jax_cache"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=helpers.xla_flags(1), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return env


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_benchmark_prints_its_table(script, tmp_path_factory):
  flags, first_column = SMALLEST[script]
  env = _smoke_env(tmp_path_factory)
  out = subprocess.run(
      [sys.executable, os.path.join("benchmarks", script), *flags],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = _table(out.stdout)
  assert [next(iter(r.values())) for r in rows] == first_column, out.stdout
  for row in rows:
    for header, cell in list(row.items())[1:]:
      value = _number(cell)
      if header in TEXT_COLUMNS:
        assert cell and value is None, (header, row)
      elif header.startswith("max abs"):  # a difference: may be 0 or absent.
        assert value is None or value < 1e-3, row
      elif header == "measured peak GiB":  # no memory stats on a CPU
        assert cell == "-", row
      elif header in SHARE_COLUMNS:
        assert value is not None and 0 <= value <= 100, (header, row)
      else:
        assert value is not None and value > 0, (header, row)
  if script == "profile_step.py":  # the op events were attributed
    for row in rows:
      shares = [_number(row[k]) for k in ("matmul",) + SHARE_COLUMNS]
      assert 97 <= sum(shares) <= 103 and shares[0] > 0, row
  if script == "mfu.py":  # remat recomputes: more FLOPs run than modelled
    for row in rows:
      assert (_number(row["hardware TFLOP/step"])
              > _number(row["model TFLOP/step"])), row
  if script == "torch_reference.py":  # the same flow: the same parameters
    for row in rows:
      assert row["params"] == row["farmer_jax params"], row


def test_decoders_benchmark_compares_decoders_of_a_trained_run(
    trained_workdir, tmp_path_factory):
  """benchmarks/decoders.py on the shared trained run (not in `SMALLEST`: it
  needs a workdir): one row per decoder; the exact one is the reference
  (zero error), the Jacobi ones are within half a uint8 level of it after
  1 .. C iterations per chunk; the sample metrics come with their errors."""
  env = _smoke_env(tmp_path_factory)
  out = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "decoders.py"),
       f"--workdir={trained_workdir}", "--jacobi=4:1e-3,0:1e-3",
       "--batch_sizes=2", "--num_samples=8", "--repeats=1", "--bootstrap=2"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = _table(out.stdout)
  assert [r["decoder"] for r in rows] == [
      "exact", "jacobi C=4 tol=0.001", "jacobi C=16 tol=0.001",
      "flow forward (one parallel pass, reference)"], out.stdout
  assert _number(rows[0]["max abs error vs exact"]) == 0
  assert _number(rows[-1]["images/s @2"]) > 0, rows[-1]
  for row, chunk in zip(rows[1:3], (4, 16)):
    assert _number(row["images/s @2"]) > 0, row
    assert _number(row["max abs error vs exact"]) < 1 / 255, row
    assert 1 <= _number(row["iterations/chunk (mean)"]) <= chunk, row
  for row in rows[:-1]:
    for key in ("sample accuracy", "Fréchet distance"):
      value, se = (_number(v.strip()) for v in row[key].split("±"))
      assert value is not None and se is not None and se >= 0, row


def test_decoders_benchmark_times_a_config_with_random_weights(
    tmp_path_factory):
  """decoders.py --config (no trained run; the GPU script's ImageNet-64
  shape, here digits:tiny): exact, Jacobi and the untrained student are
  timed; a Jacobi chunk of all N = 16 tokens converges before 16
  iterations at the default perturbation, close to the exact inverse;
  no sample-quality columns without a trained run's classifier."""
  env = _smoke_env(tmp_path_factory)
  out = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "decoders.py"),
       "--config=configs/digits.py:tiny", "--jacobi=16:1e-3",
       "--batch_sizes=2", "--num_samples=4", "--repeats=1"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "random weights" in out.stdout, out.stdout
  rows = _table(out.stdout)
  assert [r["decoder"] for r in rows] == [
      "exact", "jacobi C=16 tol=0.001", "student",
      "flow forward (one parallel pass, reference)"], out.stdout
  assert "sample accuracy" not in rows[0]
  jacobi_row = rows[1]
  assert _number(jacobi_row["max abs error vs exact"]) < 1 / 255, jacobi_row
  assert 1 <= _number(jacobi_row["iterations/chunk (mean)"]) < 16, jacobi_row
  assert all(_number(r["images/s @2"]) > 0 for r in rows), rows
