r"""One-step distillation of an ImageNet teacher's flow inverse (spec 8).

Train the teacher with configs/imagenet.py, then distil its AF inverse into
a parallel student in a workdir of its own, with the same arg:

  launch/run.sh --config=configs/imagenet_distill.py:res=256,size=1.1B \
    --workdir=gs://BUCKET/farmer/imagenet256-1.1B-student -- \
    --config.distill.teacher_workdir=gs://BUCKET/farmer/imagenet256-1.1B \
    --config.data.tfds_data_dir=gs://BUCKET/tfds

Everything outside `config.distill` is configs/imagenet.py with the same arg
(the model section must match the teacher's checkpoint; data, batch, mesh,
AdamW betas / weight decay / clipping and the log / eval / checkpoint cadence
are reused). Paper (Table 5 and section 4): 280 + 60 epochs, student input
noise s ~ U[0, 0.3] per batch, loss = mean of the per-block MSEs; FID 5.55 ->
5.63, AF inverse 0.1689 -> 0.0076 s/img.
"""
import importlib.util
import os

import ml_collections

DISTILL_EPOCHS = 60  # paper.


def _imagenet_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "imagenet.py")
  spec = importlib.util.spec_from_file_location("configs_imagenet", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """configs/imagenet.py:`arg` plus the `distill` section."""
  imagenet = _imagenet_module()
  config = imagenet.get_config(arg)
  local = config.total_steps == 10  # runlocal: a CPU smoke test.

  # Distillation (spec section 8).
  config.distill = ml_collections.ConfigDict()
  # The teacher's --workdir (a gs:// path on pods): set it on the command line.
  config.distill.teacher_workdir = "workdirs/imagenet_teacher"
  images = imagenet.TRAIN_IMAGES[config.data.tfds_name]
  config.distill.total_steps = (
      10 if local else DISTILL_EPOCHS * images // config.batch_size)
  config.distill.lr = 1e-3 if local else 1e-4  # ours: the teacher's peak LR.
  config.distill.warmup_steps = 2 if local else 1_000  # ours.
  # s in Z~_n = Z_n + s * noise, latent units. Paper: s ~ U[0, 0.3], drawn
  # once per batch ('uniform'; 'fixed' would use s = latent_noise always).
  config.distill.latent_noise = 0.3
  config.distill.latent_noise_dist = "uniform"
  config.distill.per_block = True  # paper: per-block path matching.
  # ours: EMA of the student's weights (what load_student returns).
  config.distill.ema_decay = 0.9 if local else 0.999
  return config
