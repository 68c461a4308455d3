"""A NumPy re-implementation of the tiny FARMER's forward log-density.

Written from the spec (sections 2-5) and the layer definitions, in float64
NumPy, reading only the exported weights: patchify, the AF blocks (causal
pre-LN transformer, shifted affine map with soft-clipped log-scales,
alternating token orders, terminal permutation), the AR prior (condition
tokens, GMM head per informative token, the shared redundant mixture) and
the mixture log-density. It must agree with `Farmer.log_prob` to 1e-5
nats per dimension plus 3e-6 relative (float32 sums in the model).

Weights are read through `_flow_block` / `_layer`, which accept the flow's
blocks and the transformers' layers either stacked (a leading axis, as
`nn.scan` stores them) or one entry per index.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from farmer_jax import nll
from farmer_jax.models import Farmer


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _flow_block(flow_params, t):
  if "blocks" in flow_params:  # stacked: leading axis = block
    return jax.tree.map(lambda a: a[t], flow_params["blocks"])
  return flow_params[f"block{t}"]


def _layer(transformer_params, l):
  if "layers" in transformer_params:  # stacked: leading axis = layer
    return jax.tree.map(lambda a: a[l], transformer_params["layers"])
  return transformer_params[f"layers_{l}"]


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x):  # flax's default: the tanh approximation
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _attention(x, p, causal):
  qkv = np.einsum("btd,dchk->cbthk", x, p["qkv"])
  q, k, v = qkv
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  if causal:
    t = x.shape[1]
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -1e9)
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", probs, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"])


def _transformer(x, p, num_layers, causal):
  for l in range(num_layers):
    lp = _layer(p, l)
    x = x + _attention(_layer_norm(x, lp["LayerNorm_0"]), lp["attn"], causal)
    h = _layer_norm(x, lp["LayerNorm_1"])
    m = lp["mlp"]
    x = x + _gelu(h @ m["wi"] + m["bi"]) @ m["wo"] + m["bo"]
  return _layer_norm(x, p["norm"])


def _flow(tokens, flow_params, cfg):
  """`(z, logdet)`: spec 2, y_i = (x_i - mu_i) exp(-s_i), mu, s from < i."""
  x, logdet = tokens, np.zeros(tokens.shape[0])
  for t in range(cfg.af_blocks):
    p = _flow_block(flow_params, t)
    if t % 2:
      x = x[:, ::-1]
    h = x @ p["proj_in"]["kernel"] + p["proj_in"]["bias"] + p["pos_emb"]
    h = _transformer(h, p["transformer"], cfg.af_layers_per_block, True)
    out = h @ p["head"]["kernel"] + p["head"]["bias"]
    mu, raw = np.split(out, 2, axis=-1)
    s = cfg.scale_clip * np.tanh(raw / cfg.scale_clip)
    shift = lambda a: np.concatenate([np.zeros_like(a[:, :1]), a[:, :-1]], 1)
    mu, s = shift(mu), shift(s)
    x = (x - mu) * np.exp(-s)
    logdet -= s.sum((1, 2))
    if t % 2:
      x = x[:, ::-1]
  if cfg.terminal_permutation and (cfg.af_blocks - 1) % 2 == 1:
    x = x[:, ::-1]
  return x, logdet


def _mixture_log_prob(z, raw, k, d, floor):
  """log of sum_k pi_k N(z; m_k, s_k) from the head's raw output."""
  logits = raw[..., :k]
  rest = raw[..., k:].reshape(raw.shape[:-1] + (k, 2, d))
  means = rest[..., 0, :]
  scales = np.logaddexp(0.0, rest[..., 1, :]) + floor  # softplus + floor
  u = (z[..., None, :] - means) / scales
  comp = (-0.5 * u * u - np.log(scales) - 0.5 * math.log(2 * math.pi)).sum(-1)
  log_pi = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return np.logaddexp.reduce(log_pi + comp, axis=-1)


def _prior(z, labels, p, cfg):
  """log p(Z^I | c) + log p(Z^R | Z^I, c), spec 3-4 (shared Z^R mixture)."""
  b, n, d = z.shape
  r, d_i = cfg.num_cond_tokens, cfg.d_I
  cond = p["class_emb"]["embedding"][labels]
  seq = np.concatenate([
      np.repeat(cond[:, None], r, 1),
      z[..., :d_i] @ p["proj_in"]["kernel"] + p["proj_in"]["bias"],
      np.broadcast_to(p["extra_token"], (b, 1, cond.shape[-1])),
  ], 1) + p["pos_emb"]
  h = _transformer(seq, p["transformer"], cfg.ar_layers, True)
  head_i = h[:, r - 1:r - 1 + n] @ p["head_I"]["kernel"] + p["head_I"]["bias"]
  logp = _mixture_log_prob(z[..., :d_i], head_i, cfg.K_I, d_i,
                           cfg.scale_floor).sum(-1)
  head_r = h[:, r + n] @ p["head_R"]["kernel"] + p["head_R"]["bias"]
  logp_r = _mixture_log_prob(z[..., d_i:], head_r[:, None], cfg.K_R, d - d_i,
                             cfg.scale_floor).sum(-1)
  return logp + logp_r


def numpy_log_prob(x, labels, params, cfg):
  """log p(x | c) in nats of images `x [B, H, W, C]` in `[-1, 1]`."""
  b, h, w, c = x.shape
  ps = cfg.patch_size
  tokens = x.reshape(b, h // ps, ps, w // ps, ps, c).transpose(
      0, 1, 3, 2, 4, 5).reshape(b, (h // ps) * (w // ps), ps * ps * c)
  z, logdet = _flow(tokens, params["flow"], cfg)
  return _prior(z, labels, params["prior"], cfg) + logdet


@pytest.mark.parametrize("labels", [[0, 3, 7, 9], [10, 10, 2, 5]])
def test_numpy_forward_log_density_matches_the_model(labels):
  config = helpers.load_config("digits", "tiny")
  cfg = config.model
  assert cfg.redundant_prior == "shared" and not cfg.af_class_cond
  model = Farmer(cfg)
  rng = np.random.default_rng(0)
  x_u8 = rng.integers(0, 256, (4, 8, 8, 1)).astype(np.uint8)
  x = nll.uniform_dequantize(jax.random.PRNGKey(0), jnp.asarray(x_u8))
  labels = jnp.asarray(labels, jnp.int32)  # 10 = the null label
  variables = helpers.init_random(model, x, labels, scale=0.2)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda v, x, l: model.apply(
        v, x, l, method=Farmer.log_prob))(variables, x, labels), np.float64)
  want = numpy_log_prob(np.asarray(x, np.float64), np.asarray(labels),
                        _np(variables["params"]), cfg)
  dims = 8 * 8 * 1
  # The random weights are far from the identity: the check is not trivial.
  assert np.abs(want / dims).max() > 0.1
  # 1e-5 nats/dim, plus float32's share on large values: the model sums in
  # float32 (measured: 1.3e-5 at -9.05 nats/dim, 1.5e-6 relative).
  np.testing.assert_allclose(got / dims, want / dims, atol=1e-5, rtol=3e-6)
