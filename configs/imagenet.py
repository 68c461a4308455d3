r"""FARMER on ImageNet, class-conditional, at 64x64 or 256x256.

The paper's models (FARMER-1.1B and FARMER-1.9B, ImageNet 256). A launch
with `slice=NAME` is one whose train step was compiled for that slice
ahead of time (benchmarks/aot_memory.py, the TPU compiler for TPU slices;
table in docs/benchmarks.md) and fits with >= 15% of HBM free:

  launch/run.sh --config=configs/imagenet.py:res=256,size=1.1B,slice=v5litepod-64 \
    --workdir=gs://BUCKET/farmer/imagenet256-1.1B \
    -- --config.data.tfds_data_dir=gs://BUCKET/tfds

Any other size, patch or slice: check it first with
`python benchmarks/aot_memory.py --rows=SIZE/PATCH@SLICE` (README
"Benchmarks"), then add its LAUNCH row. The 8xH100 rows were compiled by
XLA's CPU compiler on 8 fake devices (no GPU compiler here): an estimate,
to be checked on the GPU before a long run.

Data: `imagenet2012` prepared once in array_record format (nothing is
downloaded; the ILSVRC2012 tar files go in DIR/downloads/manual first):
`tfds build imagenet2012 --data_dir=DIR --file_format=array_record`.

Target (paper numbers; this code has not reached them yet): ImageNet 256
FID-50K 5.40 / 5.02 for FARMER-1.1B at patch 16 / 8 and 3.96 / 3.60 for
FARMER-1.9B, with resampling-based CFG after 320 epochs. The training run
itself reports bits/dim (the paper gives none); FID needs the sampler.

Arg keys (comma-separated, see `config_lib.parse_arg`):
  res=64|256   image side. 256: imagenet2012 resized to 256 (the paper).
               64: imagenet2012 resized to 64, labels kept.
  size=NAME    a row of SIZES: tiny, S, B, 1.1B, 1.9B. Default 1.1B at 256,
               B at 64, tiny with runlocal.
  patch=8|16   patch side at res 256 (scaled with res); default the size's
               (1.1B: 16, 1.9B: 8, the paper's headline variants).
  uncond       unconditional; with res=64 only, reads the label-free
               downsampled_imagenet/64x64.
  fsdp=N       mesh (-1, N, 1): parameters sharded N ways (FSDP), the rest
               data-parallel; fsdp=-1: mesh (1, -1, 1), FSDP over every
               chip. Default: -1 for 1.1B / 1.9B, 1 (data parallel) else.
  slice=NAME   the documented launch on that slice (LAUNCH): gradient
               accumulation steps measured to fit, e.g. slice=v4-32.
  accum=N      config.grad_accum_steps (wins over slice=); default 1.
  runlocal     tiny model, batch 8, 10 steps: a CPU smoke test of the code
               path (still needs the prepared TFDS data).

Where the values come from (paper arXiv 2510.23588v2, summarised in
docs/FARMER.md):
  * paper, Table 1: AR 12 x 768 and AF 28 blocks x 4 layers x 768
    (FARMER-1.1B); AR 24 x 1024 and AF 32 x 6 x 768 (FARMER-1.9B); both at
    patch 16 and 8. tests/config_test.py checks our AR / AF parameter counts
    against the table (within 3%; the 1.9B prior is the one mismatch, see
    the test);
  * paper, method and section 4.1: d_I=128 of d=768, K_I=64, K_R=200, the
    class token repeated x64, the terminal permutation; AdamW (0.9, 0.95),
    weight decay 0.03, cosine LR 1e-4 -> 1e-6 after 5,000 linear warm-up
    steps, 320 epochs, dequantisation noise 0.1 -> 0.005 (cosine);
  * paper, Table 6: resampling CFG's temperatures, candidate counts and w
    per size and patch (SAMPLING); ours: the z^R candidate counts (the paper
    says "larger"), r_var_scale 1, and the 1.1B/p16 row for other sizes;
  * the spec's decisions: label dropout 0.1 (for CFG), scale clip 4, GMM
    head init and scale floor;
  * ours, each marked `# ours` below (the paper does not give them): global
    batch 1024, EMA 0.9999, gradient clip 1.0, heads of 64 dims (TARFlow's),
    mlp ratio 4 (it reproduces Table 1's counts), d_I=128 also at patch 8,
    bf16 activations, remat, the mesh (full FSDP for the paper sizes) and
    gradient accumulation per slice, the weight-decay mask (norms, biases
    and embeddings undecayed: config.weight_decay_mask), the S / B / tiny rows, res=64 (the patch scales with res so each
    size keeps its token count N, and d_I scales like d), logging / eval /
    checkpoint periods.
"""
import ml_collections

from farmer_jax import config_lib

# Training images per TFDS dataset (TFDS catalogue), for steps from epochs.
TRAIN_IMAGES = {"imagenet2012": 1_281_167,
                "downsampled_imagenet/64x64": 1_281_149}
EPOCHS = 320  # paper, ImageNet 256.
HEAD_DIM = 64  # ours: heads = width // 64 (TARFlow's 64-d heads).
D_I_AT_256 = 128  # paper: informative channels of d = 16*16*3 = 768.

# name: (default patch at res 256, af_blocks, af_layers_per_block, af_width,
#        ar_layers, ar_width, remat).
# 1.1B and 1.9B: the paper's Table 1 (AR 12 x 768 / AF 28 x 4 x 768 and
# AR 24 x 1024 / AF 32 x 6 x 768); tests/config_test.py checks their AR and
# AF parameter counts against the table's. Their default patch is ours (the
# paper ran both at 16 and 8; 1.1B's headline is p16, 1.9B's p8); `patch=`
# picks the other. S / B / tiny are ours (ablations, res=64, smoke test);
# remat is ours.
SIZES = {
    "tiny": (16, 2, 1, 64, 2, 64, False),
    "S": (16, 4, 2, 384, 8, 384, False),  # ours
    "B": (16, 8, 2, 768, 12, 768, False),  # ours
    "1.1B": (16, 28, 4, 768, 12, 768, True),  # paper Table 1.
    "1.9B": (8, 32, 6, 768, 24, 1024, True),  # paper Table 1.
}
PAPER_SIZES = ("1.1B", "1.9B")
DEFAULT_SIZE = {64: "B", 256: "1.1B"}

# Per documented launch, (size, patch at res 256, slice) -> gradient
# accumulation steps at the global batch of 1024 (`slice=NAME`; ours). Only
# launches whose train step was compiled for that slice by
# benchmarks/aot_memory.py and left >= 15% of HBM free are here (table:
# docs/benchmarks.md); add a row after measuring it. All use the default
# mesh, full FSDP over every chip, and remat.
LAUNCH = {
    ("1.1B", 16, "v5litepod-64"): 1,  # 6.42 of 16 GiB per chip (libtpu).
    ("1.1B", 8, "v5litepod-64"): 2,  # 7.95 of 16 (accum 1: 14.84, 7% free).
    ("1.1B", 16, "v4-32"): 1,  # 22.80 of 32 GiB per chip (libtpu).
    ("1.9B", 16, "v5p-128"): 1,  # 8.52 of 95 GiB per chip (libtpu).
    ("1.9B", 8, "v5p-128"): 1,  # 22.20 of 95 GiB per chip (libtpu).
    ("1.9B", 8, "v4-32"): 4,  # 24.65 of 32 GiB per chip (libtpu).
    ("1.9B", 16, "v5litepod-64"): 1,  # 9.12 of 16 GiB per chip (libtpu).
    ("1.9B", 8, "v5litepod-64"): 2,  # 10.14 of 16 GiB per chip (libtpu).
    ("1.1B", 16, "v5litepod-256"): 1,  # 3.83 of 16 GiB per chip (libtpu).
    ("1.1B", 16, "v5p-128"): 1,  # 6.58 of 95 GiB per chip (libtpu).
    ("1.1B", 8, "v5p-128"): 1,  # 16.47 of 95 GiB per chip (libtpu).
    ("1.9B", 16, "v5litepod-256"): 1,  # 4.87 of 16 GiB per chip (libtpu).
    # 8 GPUs, 128 images per device per step: CPU-compiled estimates of
    # 80 GB (74.5 GiB) per GPU; without accumulation none fits.
    ("1.1B", 16, "8xH100"): 2,  # 47.24 GiB (accum 1: 89.83).
    ("1.1B", 8, "8xH100"): 4,  # 40.25 GiB (accum 1: 149.89).
    ("1.9B", 16, "8xH100"): 2,  # 56.57 GiB (accum 1: 105.45).
    ("1.9B", 8, "8xH100"): 4,  # 55.38 GiB (accum 1: 204.58).
}


# Paper Table 6, resampling CFG per (size, patch at res 256): (T_pi, T_sigma,
# s_c, s_u, T_pi_v, T_sigma_v, T_s, w) = config.sample.(logit_temp,
# scale_temp, num_candidates, num_uncond_candidates, weigh_logit_temp,
# weigh_scale_temp, resample_temp, cfg_scale), one row per paper size and
# patch. Other sizes (tiny, S, B) use the 1.1B/p16 row (ours).
SAMPLING = {
    ("1.1B", 16): (1.0, 0.9, 5, 5, 0.2, 0.9, 1.1, 2.5),
    ("1.1B", 8): (1.0, 1.0, 5, 5, 0.2, 0.9, 1.1, 2.0),
    ("1.9B", 16): (1.0, 0.9, 5, 5, 0.2, 0.9, 1.1, 3.5),
    ("1.9B", 8): (1.0, 1.0, 5, 5, 0.1, 1.0, 1.1, 1.5),
}


def _size(args) -> str:
  size = args.size or ("tiny" if args.runlocal else DEFAULT_SIZE[args.res])
  if size not in SIZES:
    raise ValueError(f"configs/imagenet.py: size={size!r} is not one of "
                     f"{list(SIZES)}.")
  return size


def _patch_256(args, size: str) -> int:
  """The patch side at res 256: `patch=` or the size's default."""
  if not args.patch:
    return SIZES[size][0]
  if args.patch not in (8, 16):
    raise ValueError(f"configs/imagenet.py: patch={args.patch}; use 8 or 16 "
                     "(the paper's two patch sizes at res 256).")
  return args.patch


def _mesh_shape(args, size: str) -> tuple[int, int, int]:
  """(data, fsdp, tensor): `fsdp=N` shards params N ways, -1 over all chips.

  Default (ours): full FSDP (1, -1, 1) for the paper sizes, whose replicated
  state (params, AdamW moments, EMA: 16 bytes per parameter) would not fit a
  16 GiB v5e chip; pure data parallelism for the small ones.
  """
  fsdp = args.fsdp if args.fsdp else (-1 if size in PAPER_SIZES else 1)
  if fsdp == -1:
    return (1, -1, 1)
  if fsdp < 1:
    raise ValueError(f"configs/imagenet.py: fsdp={fsdp}; use N >= 1 or -1 "
                     "(all devices).")
  return (-1, fsdp, 1)


def _grad_accum(args, size: str, patch_256: int) -> int:
  """`accum=N`, else the LAUNCH entry of `slice=NAME`, else 1."""
  if args.slice:
    key = (size, patch_256, args.slice)
    if key not in LAUNCH:
      raise ValueError(f"configs/imagenet.py: no launch settings for size="
                       f"{size}, patch={patch_256}, slice={args.slice}; known: "
                       f"{sorted(LAUNCH)}. Drop slice= and set accum=N.")
    return args.accum or LAUNCH[key]
  return args.accum or 1


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the ImageNet config for `arg`, e.g. 'res=256,size=1.1B'."""
  args = config_lib.parse_arg(arg, res=256, size="", patch=0, uncond=False,
                              fsdp=0, accum=0, slice="", runlocal=False)
  if args.res not in DEFAULT_SIZE:
    raise ValueError(f"configs/imagenet.py: res={args.res}; use 64 or 256.")
  if args.uncond and args.res != 64:
    raise ValueError("configs/imagenet.py: uncond needs res=64 "
                     "(downsampled_imagenet/64x64 has no labels).")
  size = _size(args)
  _, af_blocks, af_layers, af_width, ar_layers, ar_width, remat = SIZES[size]
  patch_256 = _patch_256(args, size)
  accum = _grad_accum(args, size, patch_256)
  local = args.runlocal
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: ImageNet from TFDS, fitted (center crop + resize) to res.
  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.tfds_name = ("downsampled_imagenet/64x64" if args.uncond
                           else "imagenet2012")
  config.data.tfds_data_dir = ""  # TFDS default (~/tensorflow_datasets).
  config.data.folder = ""
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.worker_count = 0 if local else 8  # ours: JPEG decoding.
  # ours: the paper's global batch (over all hosts) is not stated.
  config.batch_size = 8 if local else 1024
  config.eval_batch_size = 8 if local else 1024

  # Model (spec sections 2-4). The patch scales with res so N stays the
  # size's token count; d_I scales like d (with res**2), keeping d_I / d.
  # Patch 8 at res 256 (d = 192): we keep the paper's d_I = 128 (d_R = 64),
  # the one value the paper states and found best; keeping d_I / d instead
  # would give 32. Our reading; the paper does not say.
  config.model = ml_collections.ConfigDict()
  config.model.image_size = args.res
  config.model.channels = 3
  config.model.num_classes = 0 if args.uncond else 1000
  config.model.patch_size = patch_256 * args.res // 256
  config.model.af_blocks = af_blocks
  config.model.af_layers_per_block = af_layers
  config.model.af_width = af_width
  config.model.af_heads = af_width // HEAD_DIM
  config.model.af_class_cond = False  # spec 2: condition via the AR prefix.
  config.model.scale_clip = 4.0  # spec 2 decision: s = c * tanh(raw / c).
  config.model.terminal_permutation = True  # paper Table 2.
  config.model.prior = "farmer"
  config.model.ar_width = ar_width
  config.model.ar_layers = ar_layers
  config.model.ar_heads = ar_width // HEAD_DIM
  config.model.mlp_ratio = 4  # ours: the ViT / GPT default (fits Table 1).
  d_at_256 = patch_256 ** 2 * 3
  config.model.d_I = min(D_I_AT_256, d_at_256) * args.res ** 2 // 256 ** 2
  config.model.K_I = 4 if local else 64  # paper
  config.model.K_R = 4 if local else 200  # paper
  # 'shared': the paper's one Z^R mixture for every token; 'token': ours, each
  # token's Z^R mixture also sees its own Z^I channels (docs/FARMER.md).
  config.model.redundant_prior = "shared"
  config.model.num_cond_tokens = 4 if local else 64  # paper: class x64.
  config.model.label_drop = 0.0 if args.uncond else 0.1  # for CFG (spec 4).
  config.model.head_init_std = 0.1  # spec 4 decision.
  config.model.scale_floor = 1e-3  # spec 4 decision.
  config.model.dtype = "float32" if local else "bfloat16"  # activations.
  config.model.remat = remat  # ours: on for 1.1B / 1.9B to fit memory.
  # True: each layer stack (and the flow's blocks) is one loop, compile time flat
  # in depth; False: unrolled, same parameters (faster for small models on CPU).
  config.model.scan_layers = True
  # 'cudnn': cuDNN's fused attention on a GPU (needs dtype 'bfloat16').
  config.model.attention = "xla"
  # bf16 activations already round the operands; 'default' lets the float32
  # heads' matmuls use TF32 / one bf16 pass too. `--matmul_precision=highest`
  # on sample / evaluate / score gives float32 matmuls (docs/benchmarks.md).
  config.model.matmul_precision = "default"  # layers.MATMUL_PRECISIONS

  # Dequantisation noise during training (paper: 0.1 -> 0.005, cosine).
  config.noise_schedule = "cosine"
  config.noise_max = 0.1
  config.noise_min = 0.005

  # Optimisation (paper): AdamW (0.9, 0.95), weight decay 0.03, cosine LR
  # 1e-4 -> 1e-6 after 5,000 linear warm-up steps, 320 epochs.
  # total_steps follows --config.batch_size.
  images = TRAIN_IMAGES[config.data.tfds_name]
  config.total_steps = EPOCHS * images // config.get_ref("batch_size")
  if local:
    config.total_steps = 10
  config.lr = 1e-3 if local else 1e-4  # paper.
  config.lr_end = 0.0 if local else 1e-6  # paper: cosine down to 1e-6.
  config.warmup_steps = 2 if local else 5_000  # paper.
  config.weight_decay = 0.03  # paper.
  # Ours (the paper does not say): no decay on norm scales, biases,
  # embeddings (loop.decay_mask).
  config.weight_decay_mask = True
  config.b1 = 0.9  # paper.
  config.b2 = 0.95  # paper.
  config.grad_clip = 1.0  # ours: the usual global-norm clip.
  config.ema_decay = 0.9 if local else 0.9999  # ours: ~10k-step horizon.
  # Microbatches per step (ours, per slice: README "Training on a TPU pod"):
  # the step averages the gradients of `grad_accum_steps` slices of the
  # global batch, so one update still sees config.batch_size images.
  config.grad_accum_steps = accum
  config.max_consecutive_nonfinite = 5
  # Fault injection (tests only): loop steps whose batch becomes NaN.
  config.debug_nonfinite_steps = ()

  # Sharding: mesh axes (data, fsdp, tensor); see _mesh_shape.
  config.mesh_shape = _mesh_shape(args, size)
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

  # Logging, evaluation (exact bits/dim on validation), checkpointing.
  config.log_every = 1 if local else 100
  config.eval_every = 5 if local else 10_000
  config.num_eval_batches = 1 if local else 10  # 10 x 1024 of the 50k.
  # `evaluate`: accuracy of argmax_c log p(x | c) on this many validation
  # images; 0 skips it (1000 classes: 1000 forward passes per image).
  config.eval_bayes_images = 0
  config.num_grid_images = 4 if local else 64
  config.ckpt_every = 5 if local else 2_000
  config.keep_ckpts = 3

  # Sampling (spec 6-7): the training run's sample grid at each evaluation,
  # and the defaults of `farmer_jax.sample` / `farmer_jax.evaluate`.
  config.sample = ml_collections.ConfigDict()
  # Resampling CFG (spec 7; the paper's names first): propose s_c + s_u
  # candidates with T_pi, T_sigma; weigh them with p_c, p_u at T_pi_v,
  # T_sigma_v; pick one from softmax(T_s log w). Paper Table 6 (SAMPLING).
  (t_pi, t_sigma, s_c, s_u, t_pi_v, t_sigma_v, t_s, w) = SAMPLING.get(
      (size, patch_256), SAMPLING[("1.1B", 16)])
  config.sample.cfg_scale = w  # w; 0 = plain conditional sampling.
  config.sample.guidance = "resample"  # 'resample'|'rejection'|'closed_form'|'none'
  config.sample.proposal = "paper"  # 'paper' (Algorithm 1) | 'balance' (ours).
  config.sample.num_candidates = s_c  # s_c: candidates from p_c per AR step.
  config.sample.num_uncond_candidates = s_u  # s_u: candidates from p_u.
  config.sample.logit_temp = t_pi  # T_pi: logits / T_pi when drawing.
  config.sample.scale_temp = t_sigma  # T_sigma: scales * T_sigma when drawing.
  config.sample.weigh_logit_temp = t_pi_v  # T_pi_v: p_c, p_u's logits in weights.
  config.sample.weigh_scale_temp = t_sigma_v  # T_sigma_v: their scales there.
  config.sample.resample_temp = t_s  # T_s: > 1 sharpens the pick.
  # The redundant channels z^R (ours; the paper: "larger" counts, no value).
  config.sample.r_num_candidates = 2 * s_c  # ours: s_c for z^R.
  config.sample.r_num_uncond_candidates = 2 * s_u  # ours: s_u for z^R.
  config.sample.r_var_scale = 1.0  # ours: on z^R's variance; 0: component means.
  config.sample.denoise = False  # one Tweedie step with sigma = noise_min.
  config.sample.num_grid_images = 4 if local else 64  # 0: no sample grid in training.
  config.sample.num_eval_samples = 16 if local else 10_000  # for accuracy / Frechet distance.
  config.sample.cfg_sweep = (0.0, 0.5, 1.0, 2.0, 4.0)  # w values of `evaluate --sweep`.
  # The flow inverse of `farmer_jax.sample` / `.evaluate` (--decoder):
  # 'exact' (sequential over tokens) | 'jacobi' (models/jacobi.py) |
  # 'student' (the distilled one-step decoder, farmer_jax.distill).
  config.sample.decoder = "exact"
  # Jacobi: chunks of jacobi_chunk tokens in turn, each chunk's tokens updated
  # together until their relative change < jacobi_tol, at most
  # jacobi_max_iters times (0: the chunk size, which is exact).
  # 0: the whole sequence in one chunk (pure Jacobi). With random weights
  # (docs/benchmarks.md, decoders) it converges in 3-4 passes per block at
  # N = 256 and 1024, and is faster than a row of patches per chunk (one
  # image on a CPU, N = 1024: 5.7x the exact inverse against 2.8x);
  # jacobi_block_chunks can split the blocks a trained model finds slow.
  config.sample.jacobi_chunk = 0  # divides N; 0: the whole sequence.
  # bf16 activations round at 2^-8 (3.9e-3) relative: a tolerance below that
  # is met by luck, so chunks run on long after converging (a 768-wide flow
  # with random weights: 41.5 iterations per chunk at 1e-3, 4 at 4e-3).
  config.sample.jacobi_tol = 1e-3 if local else 1e-2
  config.sample.jacobi_max_iters = 0
  # Per-block overrides, ((block, value), ...); block 0 is nearest the data.
  config.sample.jacobi_block_chunks = ()
  config.sample.jacobi_block_max_iters = ()

  # Sample-quality classifier (farmer_jax/classifier.py), trained on the
  # training split on first use and cached in <workdir>/classifier; 0 steps
  # = none (ImageNet: FID with Inception weights is the measure there).
  config.classifier = ml_collections.ConfigDict()
  config.classifier.steps = 0
  config.classifier.batch_size = 128
  config.classifier.lr = 1e-3

  # FID / Inception Score with Inception-v3 (farmer_jax/inception.py) at
  # evaluation; the .npz comes from `python -m farmer_jax.inception
  # --out=PATH` (README.md). '' skips them.
  config.inception = ml_collections.ConfigDict()
  config.inception.weights = ""
  config.inception.num_real = 50_000  # real images of the split for the reference (-1: all).
  config.inception.reference_split = "train"  # real side of FID; "": the evaluated split.
  config.inception.batch_size = 200
  return config
