r"""One-step distillation of a digits teacher's flow inverse (spec section 8).

Train the teacher, then distil its AF inverse into a parallel student in a
workdir of its own (`farmer_jax/distill.py`):

  python -m farmer_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m farmer_jax.main --config=configs/digits_distill.py \
      --workdir=workdirs/digits_student

Everything outside `config.distill` is configs/digits.py with the same arg
('' or 'tiny'): the model section must match the teacher's checkpoint, and
data, batch size, mesh, optimiser betas / weight decay / clipping and the
log / eval / checkpoint cadence are reused. `main` runs distillation when the
config has a `distill` section with a `teacher_workdir`.
"""
import importlib.util
import os

import ml_collections


def _digits_config(arg: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")
  spec = importlib.util.spec_from_file_location("configs_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """configs/digits.py:`arg` plus the `distill` section."""
  tiny = arg == "tiny"
  config = _digits_config(arg)

  # Distillation (spec section 8).
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher_workdir = (
      "workdirs/digits_tiny" if tiny else "workdirs/digits")
  config.distill.total_steps = 100 if tiny else 1000
  config.distill.lr = 3e-3 if tiny else 1e-3
  config.distill.warmup_steps = 10 if tiny else 50
  # s in Z~_n = Z_n + s * noise, latent units (z is ~unit scale); ours, a
  # small fixed s ('fixed'). The paper draws s ~ U[0, 0.3] per batch on
  # ImageNet ('uniform', configs/imagenet_distill.py); the tiny digits
  # students were tuned with this fixed one.
  config.distill.latent_noise = 0.02
  config.distill.latent_noise_dist = "fixed"
  # True: per-block path matching; False: end-to-end MSE on pixels only.
  config.distill.per_block = True
  # EMA of the student's params (evaluation and sampling use it); the loop
  # warms it up as (1 + t) / (10 + t); 0.0 turns it off.
  config.distill.ema_decay = 0.9 if tiny else 0.99
  return config
