"""The one-step student decoder `G` of spec section 8: the AF inverse in
one parallel pass per block.

The teacher's block `t` maps `Z_t -> Z_{t+1}` (0-indexed, `Z_0 = x`) and its
exact inverse is sequential over the N tokens. Student block `t` has the
teacher block's layout and parameter names (`proj_in`, `pos_emb`,
`transformer`, `head`, ...) but **bidirectional** attention, and maps
`Z_{t+1} -> Z_t` in one pass, in the inverse's affine form:

  x_i = y_i exp(s_i) + mu_i,   (mu, s) = shift_right(head(T(proj_in(y) + pos)))

where `T` sees every token of `y` (no causal mask). Keeping the teacher's
affine form, its one-token shift and its token orders means the student's
parameters have exactly the teacher flow's tree, so it is initialised by
copying `params['flow']`; token 0 of each block passes through unchanged,
exactly as in the teacher (whose token 0 has `mu = s = 0`).

Tokens are `[B, N, d]` float32. `__call__` takes `z` in the AR prior's
order (the terminal permutation, spec section 2) like `Farmer.decode`;
`path` takes `Z_n` in raster order and returns every block's output.
"""
from typing import Any, List

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import flow


class StudentDecoder(nn.Module):
  """`G`: latents `[B, N, d]` -> tokens `[B, N, d]` in raster order.

  Its blocks are stacked and scanned like the teacher's (`flow.scan_blocks`),
  in reverse: block `n-1` first.

  Attributes:
    cfg: the model config (the teacher's; see `flow.FlowBlock`).
    num_tokens: N.
    token_dim: d.
  """
  cfg: Any
  num_tokens: int
  token_dim: int

  def setup(self):
    self.blocks = flow.FlowBlock(self.cfg, self.num_tokens, self.token_dim,
                                 causal=False, name="blocks")

  def block_inverse(self, t: int, y, labels):
    """Student block `t` alone: `Z_{t+1} -> Z_t`, raster order in and out."""
    y = y[:, ::-1] if t % 2 else y  # the teacher block's token order
    mu, s = flow.apply_block(self, t, "params_for", y, labels, causal=False)
    x = y.astype(jnp.float32) * jnp.exp(s) + mu
    return x[:, ::-1] if t % 2 else x

  def path(self, z_n, labels) -> List[jax.Array]:
    """`Z_n` (raster order) -> `[Z^_{n-1}, ..., Z^_0]`, one pass per block."""
    def body(block, x, _):
      # The carry is in block t+1's token order; block t reads its own.
      y = x[:, ::-1]
      mu, s = block.params_for(y, labels)
      x = y * jnp.exp(s) + mu
      return x, x

    n = self.cfg.af_blocks
    carry = z_n.astype(jnp.float32)
    carry = carry[:, ::-1] if n % 2 else carry  # block n's order
    _, xs = flow.scan_blocks(body, self.cfg, reverse=True)(
        self.blocks, carry, None)
    xs = flow.to_raster(xs)  # xs[t] = Z^_t
    return [xs[t] for t in reversed(range(n))]

  def __call__(self, z, labels):
    """`z [B, N, d]` in the prior's order -> tokens `[B, N, d]`, raster."""
    z_n = z[:, ::-1] if flow.terminal_flip(self.cfg) else z
    return self.path(z_n, labels)[-1]
