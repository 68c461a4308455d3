r"""Entry point: `python -m farmer_jax.main --config=configs/x.py --workdir=W`.

Thin by design: flags, multi-process initialisation, logging, then
`train.train_and_evaluate` (or `distill.distill_and_evaluate` for a config
with a `distill` section, e.g. configs/digits_distill.py). Multi-process: on
TPU pods pass `--distributed` (launch/run.sh does) and `jax.distributed`
detects the slice itself; elsewhere pass
`--coordinator_address=host:port --num_processes=N --process_id=i` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config, e.g. configs/digits.py or "
    "configs/imagenet.py:res=256,size=1.1B.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, "
                               "TensorBoard events and images go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs off TPU pods.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
    "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("JAX_PROCESS_ID", "-1")) if
    os.environ.get("JAX_PROCESS_ID") else None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("JAX_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() with its automatic cluster detection "
    "(Cloud TPU slices, Slurm, Open MPI). launch/run.sh passes it on every "
    "TPU worker; JAX's docs ask for it on multi-host TPU (it also backs "
    "Orbax's multi-host checkpointing).")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", "gloo", "CPU collectives for multi-process CPU runs.")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "Save and exit after this step, as if preempted "
    "(a job sliced into shorter runs); the schedules still end at "
    "config.total_steps and the next run resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation",
                      _CPU_COLLECTIVES.value)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value or os.environ.get("TPU_WORKER_HOSTNAMES") or (
      os.environ.get("CLOUD_TPU_TASK_ID")) or os.environ.get(
          "MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # TPU pod: everything from the environment


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from farmer_jax import distill  # pylint: disable=g-import-not-at-top
  from farmer_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("Process %d of %d; local devices %d, global devices %d (%s).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("Python %s; jax %s; flax %s.", sys.version.split()[0],
               jax.__version__, flax.__version__)
  logging.info("Config:\n%s", _CONFIG.value)
  if distill.is_distill_config(_CONFIG.value):  # spec section 8
    distill.distill_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                 stop_at_step=_STOP_AT_STEP.value)
  else:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             stop_at_step=_STOP_AT_STEP.value)


if __name__ == "__main__":
  app.run(main)
