r"""FARMER on your own images: a folder with one sub-folder per class.

  python -m farmer_jax.main \
    --config=configs/folder.py:path=/data/flowers,res=32,channels=3,classes=5 \
    --workdir=workdirs/flowers

The folder holds `<class>/<image>` files (png, jpg, jpeg, bmp, webp), or
`train/<class>/...` and `test/<class>/...`; without those two a fixed 10%
is held out for evaluation (see farmer_jax/input_pipeline.py). Images are
center-cropped, resized to `res` and converted to `channels`.

Arg keys (comma-separated, see `config_lib.parse_arg`):
  path=DIR      the folder (required).
  classes=K     number of class sub-folders (required; 0 = unconditional
                is not supported by a class-per-folder tree).
  res=32        image side in pixels.
  channels=3    1 (grayscale) or 3 (RGB).
  patch=P       patch side; default the largest divisor of res up to res/8,
                i.e. about 8x8 = 64 tokens.

A modest model (~3M parameters) sized for one GPU or a few CPU cores; it
makes no claim about the result it reaches: watch test bits/dim fall.
"""
import ml_collections

from farmer_jax import config_lib


def _default_patch(res: int) -> int:
  """Largest divisor of res that is at most res // 8 (about 64 tokens)."""
  return max(p for p in range(1, max(res // 8, 1) + 1) if res % p == 0)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the folder config; `arg` like 'path=/dir,res=32,classes=10'."""
  args = config_lib.parse_arg(arg, path="", res=32, channels=3, classes=-1,
                              patch=0)
  if not args.path or args.classes < 1:
    raise ValueError("configs/folder.py needs path=DIR and classes=K (the "
                     "number of class sub-folders), e.g. "
                     "'path=/data/flowers,classes=5'.")
  patch = args.patch or _default_patch(args.res)
  token_dim = patch ** 2 * args.channels
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: the class-per-folder tree; splits 'train' and 'test'.
  config.data = ml_collections.ConfigDict()
  config.data.source = "folder"
  config.data.tfds_name = ""
  config.data.tfds_data_dir = ""
  config.data.folder = args.path
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.worker_count = 0  # Grain worker processes; 0 = in-process.
  config.batch_size = 64  # global, over all processes.
  config.eval_batch_size = 64

  # Model (spec sections 2-4).
  config.model = ml_collections.ConfigDict()
  config.model.image_size = args.res
  config.model.channels = args.channels
  config.model.num_classes = args.classes
  config.model.patch_size = patch
  config.model.af_blocks = 4
  config.model.af_layers_per_block = 2
  config.model.af_width = 128
  config.model.af_heads = 4
  config.model.af_class_cond = False  # spec 2: condition via the AR prefix.
  config.model.scale_clip = 4.0  # s = c * tanh(raw / c).
  config.model.terminal_permutation = True
  config.model.prior = "farmer"  # 'farmer' | 'gaussian' (TARFlow ablation).
  config.model.ar_width = 128
  config.model.ar_layers = 4
  config.model.ar_heads = 4
  config.model.mlp_ratio = 4
  # A quarter of the token dim is informative (the paper: 128 of 768 at
  # ImageNet 256; small images have less to leave out).
  config.model.d_I = max(1, token_dim // 4)
  config.model.K_I = 16
  config.model.K_R = 16
  # 'shared': the paper's one Z^R mixture for every token; 'token': ours, each
  # token's Z^R mixture also sees its own Z^I channels (docs/FARMER.md).
  config.model.redundant_prior = "shared"
  config.model.num_cond_tokens = 4
  config.model.label_drop = 0.1
  config.model.head_init_std = 0.1
  config.model.scale_floor = 1e-3
  config.model.dtype = "float32"  # activations; params are always float32.
  config.model.remat = "none"  # or a layers.REMAT_POLICIES name.
  # True: each layer stack (and the flow's blocks) is one loop, compile time flat
  # in depth; False: unrolled, same parameters (faster for small models on CPU).
  config.model.scan_layers = True
  # 'cudnn': cuDNN's fused attention on a GPU (needs dtype 'bfloat16').
  config.model.attention = "xla"
  # float32 means float32 on every backend ('default': TF32 on a GPU, one
  # bf16 pass on a TPU; docs/benchmarks.md). No cost on a CPU.
  config.model.matmul_precision = "highest"  # layers.MATMUL_PRECISIONS

  # Dequantisation noise during training (spec 1), [-1, 1] units.
  config.noise_schedule = "cosine"  # 'cosine' | 'constant' | 'uniform'
  config.noise_max = 0.1
  config.noise_min = 0.005

  # Optimisation.
  config.total_steps = 10_000
  config.lr = 5e-4
  config.lr_end = 0.0  # the cosine schedule's final learning rate.
  config.warmup_steps = 500
  config.weight_decay = 1e-4
  # True: no decay on norm scales, biases, embeddings (loop.decay_mask).
  # False: as digits.
  config.weight_decay_mask = False
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip = 1.0
  config.ema_decay = 0.999
  config.grad_accum_steps = 1  # microbatches per step (memory).
  config.max_consecutive_nonfinite = 5
  # Fault injection (tests only): loop steps whose batch becomes NaN.
  config.debug_nonfinite_steps = ()

  # Sharding: mesh axes (data, fsdp, tensor); one size may be -1.
  config.mesh_shape = (-1, 1, 1)
  config.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("length", None),
      ("layers", None),
      ("blocks", None),
      ("vocab", None),
      ("mixture", None),
  )

  # Logging, evaluation, checkpointing.
  config.log_every = 50
  config.eval_every = 1000
  config.num_eval_batches = -1  # -1: the whole split.
  # `evaluate`: test accuracy of argmax_c log p(x | c) on this many test
  # images (0: skip); one forward pass per image and class.
  config.eval_bayes_images = 500
  config.num_grid_images = 64
  config.ckpt_every = 1000
  config.keep_ckpts = 3

  # Sampling (spec 6-7): the training run's sample grid at each evaluation,
  # and the defaults of `farmer_jax.sample` / `farmer_jax.evaluate`.
  config.sample = ml_collections.ConfigDict()
  config.sample.cfg_scale = 1.0  # w; 0 = plain conditional sampling.
  config.sample.guidance = "resample"  # 'resample'|'rejection'|'closed_form'|'none'
  # Resampling CFG (spec 7; the paper's names first): propose s_c + s_u
  # candidates with T_pi, T_sigma; weigh them with p_c, p_u at T_pi_v,
  # T_sigma_v; pick one from softmax(T_s log w).
  config.sample.proposal = "paper"  # 'paper' (Algorithm 1) | 'balance' (ours).
  config.sample.num_candidates = 16  # s_c: candidates from p_c per AR step.
  config.sample.num_uncond_candidates = 0  # s_u: candidates from p_u.
  config.sample.logit_temp = 1.0  # T_pi: logits / T_pi when drawing.
  config.sample.scale_temp = 1.0  # T_sigma: scales * T_sigma when drawing.
  config.sample.weigh_logit_temp = 1.0  # T_pi_v: p_c, p_u's logits in weights.
  config.sample.weigh_scale_temp = 1.0  # T_sigma_v: their scales in weights.
  config.sample.resample_temp = 1.0  # T_s: > 1 sharpens the pick.
  # The redundant channels z^R (ours; the paper: "larger" counts, no value).
  config.sample.r_num_candidates = 32  # s_c for z^R.
  config.sample.r_num_uncond_candidates = 0  # s_u for z^R.
  config.sample.r_var_scale = 1.0  # on z^R's variance; 0: component means.
  config.sample.denoise = False  # one Tweedie step with sigma = noise_min.
  config.sample.num_grid_images = 64  # 0: no sample grid in training.
  config.sample.num_eval_samples = 1000  # for accuracy / Frechet distance.
  config.sample.cfg_sweep = (0.0, 0.5, 1.0, 2.0, 4.0)  # w values of `evaluate --sweep`.
  # The flow inverse of `farmer_jax.sample` / `.evaluate` (--decoder):
  # 'exact' (sequential over tokens) | 'jacobi' (models/jacobi.py) |
  # 'student' (the distilled one-step decoder, farmer_jax.distill).
  config.sample.decoder = "exact"
  # Jacobi: chunks of jacobi_chunk tokens in turn, each chunk's tokens updated
  # together until their relative change < jacobi_tol, at most
  # jacobi_max_iters times (0: the chunk size, which is exact).
  config.sample.jacobi_chunk = 0  # divides N; 0: the whole sequence.
  config.sample.jacobi_tol = 1e-3
  config.sample.jacobi_max_iters = 0
  # Per-block overrides, ((block, value), ...); block 0 is nearest the data.
  config.sample.jacobi_block_chunks = ()
  config.sample.jacobi_block_max_iters = ()

  # Sample-quality classifier (farmer_jax/classifier.py), trained on the
  # training split on first use and cached in <workdir>/classifier; 0 steps
  # = none (ImageNet: FID with Inception weights is the measure there).
  config.classifier = ml_collections.ConfigDict()
  config.classifier.steps = 2000
  config.classifier.batch_size = 128
  config.classifier.lr = 1e-3

  # FID / Inception Score with Inception-v3 (farmer_jax/inception.py) at
  # evaluation; the .npz comes from `python -m farmer_jax.inception
  # --out=PATH` (README.md). '' skips them.
  config.inception = ml_collections.ConfigDict()
  config.inception.weights = ""
  config.inception.num_real = -1  # real images of the split for the reference (-1: all).
  config.inception.reference_split = ""  # real side of FID; "": the evaluated split.
  config.inception.batch_size = 100
  return config
