"""The autoregressive prior over the latents, spec sections 3-4.

A causal transformer reads `[cond x r] + [z_1^I ... z_N^I] + [extra]`:

* position `r - 1 + (i - 1)` (the token before `z_i^I`) gives a diagonal
  Gaussian mixture over `R^{d_I}` with `K_I` components for `z_i^I`;
* the extra token's output gives the mixture over `R^{d_R}` with `K_R`
  components for the redundant channels `z_i^R`. With
  `redundant_prior='shared'` (the paper) it is one mixture that scores every
  token's `z_i^R`; with `'token'` (ours, an option) a small MLP adds token
  `i`'s own informative channels `z_i^I` and its position to the extra
  token's output before the head, so each token gets its own mixture, still
  in one parallel pass and still an exact density of `Z^R` given `Z^I`.

Labels index a table of `num_classes + 1` embeddings; index `num_classes`
is the learned null embedding (label dropout during training, the
unconditional stream of guidance, and every label of an unconditional
model). Mixture parameters and log-probs are float32.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import gmm
from farmer_jax.models import layers


class ARPrior(nn.Module):
  """log p(Z | c) for latents `z [B, N, d]` split as `[d_I | d_R]` channels.

  Attributes:
    cfg: model config (ar_width, ar_layers, ar_heads, mlp_ratio, d_I, K_I,
      K_R, num_cond_tokens, num_classes, label_drop, head_init_std,
      scale_floor, dtype, remat, scan_layers, attention, matmul_precision).
    num_tokens: N.
    token_dim: d.
  """
  cfg: Any
  num_tokens: int
  token_dim: int

  @property
  def d_r(self) -> int:
    return self.token_dim - self.cfg.d_I

  def setup(self):
    cfg = self.cfg
    w = cfg.ar_width
    dtype = jnp.dtype(cfg.dtype)
    prec = layers.precision(cfg.matmul_precision)
    self.class_emb = nn.Embed(
        cfg.num_classes + 1, w, name="class_emb",
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
    self.proj_in = nn.Dense(
        w, dtype=dtype, precision=prec, name="proj_in",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (None, "embed")))
    seq_len = cfg.num_cond_tokens + self.num_tokens + 1
    self.pos_emb = self.param(
        "pos_emb", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("length", "embed")), (seq_len, w))
    self.extra_token = self.param(
        "extra_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (w,))
    self.transformer = layers.Transformer(
        cfg.ar_layers, cfg.ar_heads, cfg.mlp_ratio, causal=True, dtype=dtype,
        remat=cfg.remat, scan=cfg.scan_layers, attention=cfg.attention,
        precision=prec, name="transformer")
    self.head_I = self._head(cfg.K_I, cfg.d_I, "head_I", prec)
    if self.d_r > 0:
      self.head_R = self._head(cfg.K_R, self.d_r, "head_R", prec)
      if cfg.redundant_prior == "token":
        self.token_R = nn.Dense(
            w, dtype=dtype, precision=prec, name="token_R",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(), (None, "embed")))
        self.pos_R = self.param(
            "pos_R", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("length", "embed")),
            (self.num_tokens, w))
        self.mlp_R = layers.Mlp(cfg.mlp_ratio, dtype, prec, name="mlp_R")
        self.norm_R = layers.LayerNorm(dtype, name="norm_R")
      elif cfg.redundant_prior != "shared":
        raise ValueError(f"config.model.redundant_prior="
                         f"{cfg.redundant_prior!r}: use 'shared' or 'token'.")

  def _head(self, k: int, d: int, name: str, prec) -> nn.Dense:
    # Small non-zero init so components do not start tied (spec section 4);
    # the bias puts softplus(raw scale) at 1.
    std = self.cfg.head_init_std
    softplus_inv_1 = 0.5413248546129181

    def bias_init(rng, shape, dtype=jnp.float32):
      offset = jnp.zeros((k, 2, d), dtype).at[:, 1].set(softplus_inv_1)
      offset = jnp.concatenate([jnp.zeros((k,), dtype), offset.reshape(-1)])
      return offset + std * jax.random.normal(rng, shape, dtype)

    return nn.Dense(
        gmm.num_outputs(k, d), dtype=jnp.float32, precision=prec, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(std / self.cfg.ar_width ** 0.5),
            ("embed", "mixture")),
        bias_init=bias_init)

  def _mixture(self, head: nn.Dense, h, k: int, d: int) -> gmm.Mixture:
    return gmm.split_head(head(h.astype(jnp.float32)), k, d,
                          self.cfg.scale_floor)

  def redundant_mixture(self, h_extra, z_i) -> gmm.Mixture:
    """The mixture(s) for `Z^R` from the extra token's output `[B, W]`.

    'shared': one mixture, leading axes `[B]`. 'token': token `i`'s mixture
    also sees `z_i^I` (`z_i [B, N, d_I]`) and position `i`: leading axes
    `[B, N]`.
    """
    cfg = self.cfg
    if cfg.redundant_prior == "shared":
      return self._mixture(self.head_R, h_extra, cfg.K_R, self.d_r)
    h = (h_extra[:, None] + self.token_R(z_i.astype(jnp.float32))
         + self.pos_R.astype(h_extra.dtype))
    h = h + self.mlp_R(self.norm_R(h))
    return self._mixture(self.head_R, h, cfg.K_R, self.d_r)

  def cond_embedding(self, labels, train: bool):
    """`[B]` labels -> `[B, W]`; dropped or unconditional -> null embedding."""
    null = self.cfg.num_classes
    if null == 0:
      labels = jnp.zeros_like(labels)
    elif train and self.cfg.label_drop > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.cfg.label_drop,
                                  labels.shape)
      labels = jnp.where(drop, null, labels)
    return self.class_emb(labels)

  def __call__(self, z, labels, train: bool = False
               ) -> Tuple[gmm.Mixture, gmm.Mixture]:
    """Teacher-forced pass: mixtures for every `z_i^I` and the shared one.

    Args:
      z: latents `[B, N, d]` (only the first `d_I` channels are read).
      labels: `[B]` int.
      train: enables label dropout (needs the 'dropout' RNG).

    Returns:
      `(mix_I, mix_R)`: `mix_I` with leading axes `[B, N]`, `mix_R` `[B]`
      ('shared') or `[B, N]` ('token'); `None` when `d_R == 0`.
    """
    cfg = self.cfg
    r, n = cfg.num_cond_tokens, self.num_tokens
    dtype = jnp.dtype(cfg.dtype)
    cond = self.cond_embedding(labels, train).astype(dtype)
    seq = jnp.concatenate([
        jnp.broadcast_to(cond[:, None], (z.shape[0], r, cond.shape[-1])),
        self.proj_in(z[..., :cfg.d_I]),
        jnp.broadcast_to(self.extra_token.astype(dtype),
                         (z.shape[0], 1, cond.shape[-1])),
    ], axis=1) + self.pos_emb.astype(dtype)
    h, _ = self.transformer(seq)
    mix_i = self._mixture(self.head_I, h[:, r - 1:r - 1 + n], cfg.K_I, cfg.d_I)
    mix_r = (self.redundant_mixture(h[:, r + n], z[..., :cfg.d_I])
             if self.d_r > 0 else None)
    return mix_i, mix_r

  def log_prob(self, z, labels, train: bool = False):
    """`(log p(Z^I | c), log p(Z^R | Z^I, c))`, each `[B]` in nats."""
    mix_i, mix_r = self(z, labels, train)
    logp_i = gmm.log_prob(z[..., :self.cfg.d_I], mix_i).sum(-1)
    if mix_r is None:
      return logp_i, jnp.zeros_like(logp_i)
    if self.cfg.redundant_prior == "shared":
      mix_r = jax.tree.map(lambda a: a[:, None], mix_r)  # share over tokens
    logp_r = gmm.log_prob(z[..., self.cfg.d_I:], mix_r).sum(-1)
    return logp_i, logp_r

  # --- KV-cached decoding (sampling) -------------------------------------

  def init_cache(self, batch: int) -> layers.Cache:
    cfg = self.cfg
    return layers.init_cache(cfg.ar_layers, batch,
                             cfg.num_cond_tokens + self.num_tokens + 1,
                             cfg.ar_width, cfg.ar_heads, jnp.dtype(cfg.dtype))

  def _step(self, h_in, cache, pos):
    h = h_in[:, None] + self.pos_emb[pos].astype(h_in.dtype)
    h, cache = self.transformer(h, cache, pos)
    return h[:, 0], cache

  def prefill(self, labels, cache):
    """Feeds all `r` cond tokens in one parallel pass.

    Returns:
      (mixture for `z_1^I`, cache with positions `< r` written).
    """
    r = self.cfg.num_cond_tokens
    cond = self.cond_embedding(labels, False).astype(jnp.dtype(self.cfg.dtype))
    seq = jnp.broadcast_to(cond[:, None], (cond.shape[0], r, cond.shape[-1]))
    h, (k, v) = self.transformer(seq + self.pos_emb[:r].astype(seq.dtype),
                                 return_kv=True)
    cache = layers.write_cache(cache, (k, v), 0)
    return self._mixture(self.head_I, h[:, -1], self.cfg.K_I,
                         self.cfg.d_I), cache

  def decode_token(self, z_i, cache, pos):
    """Feeds `z_i^I [B, d_I]` at `pos`; returns (mixture for next, cache)."""
    h, cache = self._step(self.proj_in(z_i), cache, pos)
    return self._mixture(self.head_I, h, self.cfg.K_I, self.cfg.d_I), cache

  def decode_extra(self, cache, z_i):
    """Feeds the extra token; the `Z^R` mixture(s) given `z_i [B, N, d_I]`.

    Leading axes `[B]` ('shared') or `[B, N]` ('token'), as in `__call__`.
    """
    b = cache[0].shape[1]
    pos = self.cfg.num_cond_tokens + self.num_tokens
    h_in = jnp.broadcast_to(self.extra_token.astype(jnp.dtype(self.cfg.dtype)),
                            (b, self.cfg.ar_width))
    h, _ = self._step(h_in, cache, pos)
    return self.redundant_mixture(h, z_i)
