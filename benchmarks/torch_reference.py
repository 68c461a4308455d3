r"""A same-machine PyTorch reference for the train-step and inverse speed comparison.

The Gaussian-prior flow of `bench_lib.REFERENCE` (the TARFlow ablation)
rewritten in PyTorch with the same shapes and work as
`farmer_jax/models/flow.py`: patchify, `af_blocks` blocks of `proj_in` +
learned positions, pre-LN causal transformer layers (64-d heads, q/k/v/out
without bias, GELU-tanh MLP x4), final LayerNorm, zero-initialised head
giving mu and s = c tanh(raw / c) shifted right one token, the sequence
reversed after every block; loss = mean exact NLL under N(0, I).

Measured, float32, on `--device` (the CPU with `--threads` threads, or e.g.
`cuda`), per row:

* train: forward + backward + global-norm clipping + AdamW + EMA (as
  `train.train_step`), `--warmup` untimed steps then the mean of `--steps`;
* inverse: z -> x at batch `--inverse_batch`, one token at a time per block
  with preallocated KV caches, median of `--inverse_repeats` calls.

Before timing, inverse(forward(x)) is checked (perturbed heads) to < 1e-4.

  python benchmarks/torch_reference.py --rows=refS,refM --steps=10
  python benchmarks/torch_reference.py --rows=refM --compile
"""
import math
import statistics
import time

from absl import app
from absl import flags
import torch
from torch import nn
from torch.nn import functional as F

import bench_lib

_ROWS = flags.DEFINE_list("rows", ["refS", "refM"], "Rows of REFERENCE.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps first.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
_INV_BATCH = flags.DEFINE_integer("inverse_batch", 16, "Batch of the inverse.")
_INV_REPEATS = flags.DEFINE_integer("inverse_repeats", 3,
                                    "Timed inverse calls (after one untimed).")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device: cpu, cuda.")
_TF32 = flags.DEFINE_bool("tf32", False, "CUDA: allow TF32 matmuls (XLA's "
                          "default for float32 dots on recent GPUs).")
_COMPILE = flags.DEFINE_bool("compile", False,
                             "torch.compile the train step's model.")

HEAD_DIM = 64
SCALE_CLIP = bench_lib.load_config().model.scale_clip  # 4.0
NOISE_STD = 0.05
EMA_DECAY = 0.9999
_lerp_ = torch._foreach_lerp_  # pylint: disable=protected-access


class Layer(nn.Module):
  """Pre-LN transformer layer: causal attention + GELU MLP."""

  def __init__(self, width: int):
    super().__init__()
    self.heads = width // HEAD_DIM
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.q, self.k, self.v, self.out = (
        nn.Linear(width, width, bias=False) for _ in range(4))
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.fc1 = nn.Linear(width, 4 * width)
    self.fc2 = nn.Linear(4 * width, width)

  def _split(self, a):  # [B, T, W] -> [B, H, T, 64]
    return a.unflatten(-1, (self.heads, HEAD_DIM)).transpose(1, 2)

  def forward(self, x, cache=None, pos: int = 0):
    h = self.norm1(x)
    q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(
        self.v(h))
    if cache is None:
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:  # one query at `pos`: keys 0..pos, no mask needed.
      k_cache, v_cache = cache
      k_cache[:, :, pos] = k[:, :, 0]
      v_cache[:, :, pos] = v[:, :, 0]
      a = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1],
                                         v_cache[:, :, :pos + 1])
    x = x + self.out(a.transpose(1, 2).flatten(2))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Block(nn.Module):
  """One AF block on tokens `[B, N, d]` already in its order."""

  def __init__(self, num_tokens: int, dim: int, width: int, layers: int):
    super().__init__()
    self.proj_in = nn.Linear(dim, width)
    nn.init.xavier_uniform_(self.proj_in.weight)
    nn.init.zeros_(self.proj_in.bias)
    self.pos_emb = nn.Parameter(0.02 * torch.randn(num_tokens, width))
    self.layers = nn.ModuleList(Layer(width) for _ in range(layers))
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, 2 * dim)
    nn.init.zeros_(self.head.weight)
    nn.init.zeros_(self.head.bias)

  def _shift_scale(self, h):
    mu, raw = self.head(self.norm(h)).chunk(2, dim=-1)
    return mu, SCALE_CLIP * torch.tanh(raw / SCALE_CLIP)

  def forward(self, x):
    h = self.proj_in(x) + self.pos_emb
    for layer in self.layers:
      h = layer(h)
    mu, s = (F.pad(a[:, :-1], (0, 0, 1, 0)) for a in self._shift_scale(h))
    return (x - mu) * torch.exp(-s), -s.sum(dim=(1, 2))

  def inverse(self, y):
    b, n, d = y.shape
    shape = (b, self.layers[0].heads, n, HEAD_DIM)
    caches = [(y.new_zeros(shape), y.new_zeros(shape)) for _ in self.layers]
    x = torch.empty_like(y)
    mu = s = y.new_zeros(b, d)
    for i in range(n):  # N transformer steps, as the JAX scan (last unused).
      x[:, i] = y[:, i] * torch.exp(s) + mu
      h = self.proj_in(x[:, i:i + 1]) + self.pos_emb[i]
      for layer, cache in zip(self.layers, caches):
        h = layer(h, cache, i)
      mu, s = self._shift_scale(h[:, 0])
    return x


class Flow(nn.Module):
  """Patchify + the AF blocks; `forward` gives the mean NLL in nats."""

  def __init__(self, image, channels, patch, width, blocks, layers):
    super().__init__()
    self.p, self.n = patch, (image // patch) ** 2
    self.blocks = nn.ModuleList(
        Block(self.n, patch * patch * channels, width, layers)
        for _ in range(blocks))

  def patchify(self, x):  # [B, C, H, W] -> [B, N, p*p*C], (p, p, C) order.
    b, c, h, w = x.shape
    p = self.p
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, self.n, p * p * c)

  def encode(self, tokens):
    logdet = tokens.new_zeros(tokens.shape[0])
    for block in self.blocks:
      tokens, ld = block(tokens)
      tokens, logdet = tokens.flip(1), logdet + ld
    return tokens, logdet

  @torch.no_grad()
  def decode(self, z):
    for block in reversed(self.blocks):
      z = block.inverse(z.flip(1))
    return z

  def forward(self, images):
    z, logdet = self.encode(self.patchify(images))
    nll = (0.5 * z * z + 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2)) - logdet
    return nll.mean()


def sync():
  """Waits for the device's queued work (timing on an asynchronous GPU)."""
  if _DEVICE.value.startswith("cuda"):
    torch.cuda.synchronize()


def check_inverse(row: str):
  """Aborts unless decode(encode(x)) == x to 1e-4 with perturbed heads."""
  torch.manual_seed(1)
  model = Flow(*bench_lib.REFERENCE[row][:6]).to(_DEVICE.value)
  with torch.no_grad():
    for block in model.blocks:
      block.head.weight.normal_(0.0, 0.02)
      block.head.bias.normal_(0.0, 0.02)
    tokens = model.patchify(torch.randn(4, *image_shape(row),
                                        device=_DEVICE.value))
    z, logdet = model.encode(tokens)
  err = (model.decode(z) - tokens).abs().max().item()
  if not err < 1e-4 or logdet.abs().max().item() == 0.0:
    raise SystemExit(f"Inverse check failed on {row}: max |x - F^-1(F(x))| "
                     f"= {err:.2e} (|logdet| max {logdet.abs().max():.2e}).")
  print(f"Inverse check ({row}, batch 4, perturbed heads): max abs error "
        f"{err:.1e}")


def image_shape(row: str):
  image, channels = bench_lib.REFERENCE[row][:2]
  return channels, image, image


def jax_param_count(row: str) -> str:
  """farmer_jax's Gaussian-prior model's size, by `jax.eval_shape`."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    from farmer_jax.models import farmer  # pylint: disable=g-import-not-at-top
    model = farmer.Farmer(bench_lib.reference_config(row, "gaussian").model)
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(
        lambda: farmer.init_params(model, {"params": key, "dropout": key}))
    return f"{sum(a.size for a in jax.tree.leaves(shapes)) / 1e6:.3f}M"
  except Exception as e:  # pylint: disable=broad-except
    print(f"farmer_jax parameter count unavailable: {e!r}")
    return "n/a"


def measure(row: str) -> list:
  """Times the train step and the inverse of one REFERENCE row."""
  torch.manual_seed(0)
  *arch, batch = bench_lib.REFERENCE[row]
  model = Flow(*arch).to(_DEVICE.value)
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                          weight_decay=0.03, foreach=True)
  loss_fn = model
  if _COMPILE.value:
    loss_fn = torch.compile(model)
  images = torch.randint(0, 256, (batch, *image_shape(row)), dtype=torch.uint8,
                         device=_DEVICE.value)

  def train_step(loss_fn):
    x = images.float() / 127.5 - 1.0
    loss = loss_fn(x + NOISE_STD * torch.randn_like(x))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    with torch.no_grad():
      _lerp_(ema, params, 1.0 - EMA_DECAY)
    return loss

  compiled = "eager"
  if _COMPILE.value:
    try:
      start = time.perf_counter()
      train_step(loss_fn)  # compiles (lazily, at the first call).
      compiled = f"compiled ({time.perf_counter() - start:.0f} s)"
    except Exception as e:  # pylint: disable=broad-except
      print(f"torch.compile failed on {row}, falling back to eager: {e!r}")
      loss_fn = model
  for _ in range(_WARMUP.value):
    train_step(loss_fn)
  sync()
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    loss = train_step(loss_fn)
  sync()
  step_s = (time.perf_counter() - start) / _STEPS.value
  if not math.isfinite(loss.item()):
    raise SystemExit(f"{row}: non-finite loss {loss.item()}")

  model.eval()
  z = torch.randn(_INV_BATCH.value, model.n, arch[2] ** 2 * arch[1],
                  device=_DEVICE.value)
  model.decode(z)  # untimed
  times = []
  for _ in range(_INV_REPEATS.value):
    sync()
    start = time.perf_counter()
    model.decode(z)
    sync()
    times.append(time.perf_counter() - start)
  inverse_s = statistics.median(times)
  num_params = sum(p.numel() for p in params)
  return [row, f"{num_params / 1e6:.3f}M", jax_param_count(row), compiled,
          step_s * 1e3, batch / step_s, _INV_BATCH.value / inverse_s,
          torch.__version__,
          _DEVICE.value if _DEVICE.value != "cpu" else torch.get_num_threads()]


def main(argv):
  del argv
  torch.set_num_threads(_THREADS.value)
  check_inverse("refS")  # in float32 (with TF32 a GPU misses by ~2e-3)
  torch.backends.cuda.matmul.allow_tf32 = _TF32.value
  rows = [measure(row) for row in _ROWS.value]
  print(bench_lib.table(
      ["row", "params", "farmer_jax params", "mode", "train ms/step",
       "train images/s", f"inverse images/s (batch {_INV_BATCH.value})",
       "torch version", "threads / device"], rows))


if __name__ == "__main__":
  app.run(main)
