r"""Sampling speed: AR decoding and the flow inverse, KV-cached vs uncached.

Two stages of `sampling.sample_images`, each jitted, timed per batch size
(median of `--repeats` calls after one compile call) on a randomly
initialised (and perturbed) model of size `--size` (digits 28x28x1: N = 49
tokens):

* AR decoding of the latents, unguided (`cfg_scale=0`, one stream):
  cached = `sampling.sample_latents` (one `lax.scan`, preallocated KV
  caches); uncached = one full teacher-forced pass of the prior per token
  over the prefix decoded so far (N + 1 passes, what decoding costs
  without a cache);
* the flow inverse `F^-1`: cached = `Farmer.decode` (one `nn.scan` per AF
  block over tokens, KV caches); uncached = one full parallel pass of a
  block per recovered token (as `tests/sampling_test.py`'s `naive_decode`),
  and the largest |difference| of the two (they are the same function).

  python benchmarks/sampling_speed.py --batch_sizes=1,8,64 --size=S
  python benchmarks/sampling_speed.py --batch_sizes=16 --size=refM
"""
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import bench_lib
from farmer_jax import sampling
from farmer_jax.models import Farmer
from farmer_jax.models import gmm
from farmer_jax.models import unpatchify

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "64"],
                                 "Batch sizes to time.")
_SIZE = flags.DEFINE_string("size", "S",
                            "Row of SIZES, or refS / refM / digits.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")


def _prior(model, params, z, labels):
  return model.apply(params, z, labels, method=lambda m, z, l: m.prior(z, l))


def uncached_latents(model, params, rng, labels):
  """AR decoding with a full prior pass per token (no KV cache)."""
  n, d_i = model.num_tokens, model.config.d_I
  z = jnp.zeros((labels.shape[0], n, model.token_dim))

  def body(i, z):
    mix_i, _ = _prior(model, params, z, labels)
    mix = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(
        a, i, axis=1, keepdims=False), mix_i)
    z_i = gmm.sample(jax.random.fold_in(rng, i), mix)
    return z.at[:, i, :d_i].set(z_i)

  z = jax.lax.fori_loop(0, n, body, z)
  if model.token_dim > d_i:
    _, mix_r = _prior(model, params, z, labels)
    rng_r = jax.random.fold_in(rng, n)
    if mix_r.logits.ndim == 3:  # redundant_prior='token': [B, N] mixtures
      z_r = gmm.sample(rng_r, mix_r)
    else:  # the paper's shared mixture, one draw per token
      z_r = jnp.swapaxes(jax.lax.map(lambda key: gmm.sample(key, mix_r),
                                     jax.random.split(rng_r, n)), 0, 1)
    z = z.at[..., d_i:].set(z_r)
  return z


def uncached_decode(model, params, z, labels):
  """`F^-1` with one full parallel pass of a block per recovered token."""
  cfg = model.config
  flip = cfg.terminal_permutation and cfg.af_blocks % 2 == 0
  x = z[:, ::-1] if flip else z  # the prior's order -> raster order
  for t in reversed(range(cfg.af_blocks)):
    y = x[:, ::-1] if t % 2 else x

    def body(i, x, t=t, y=y):
      mu, s = model.apply(params, x, labels, method=lambda m, x, l: (
          m.flow.block_apply(t, 'params_for', x, l)))
      return x.at[:, i].set(y[:, i] * jnp.exp(s[:, i]) + mu[:, i])

    x = jax.lax.fori_loop(0, y.shape[1], body, jnp.zeros_like(y))
    x = x[:, ::-1] if t % 2 else x
  side = cfg.image_size
  return unpatchify(x, cfg.patch_size, side, side)


def main(argv):
  del argv
  config = (bench_lib.sized_config(_SIZE.value)
            if _SIZE.value in bench_lib.SIZES
            else bench_lib.reference_config(_SIZE.value, "farmer"))
  model = Farmer(config.model)
  s, c = config.model.image_size, config.model.channels
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, s, s, c)),
                               jnp.zeros((1,), jnp.int32))
  # Perturbed so the flow is not the identity (its heads start at zero).
  leaves, treedef = jax.tree.flatten(params["params"])
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = {"params": jax.tree.unflatten(treedef, [
      a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])}
  fns = {
      "ar_cached": jax.jit(functools.partial(sampling.sample_latents, model)),
      "ar_uncached": jax.jit(functools.partial(uncached_latents, model)),
      "flow_cached": jax.jit(lambda p, z, l: model.apply(
          p, z, l, method=Farmer.decode)),
      "flow_uncached": jax.jit(functools.partial(uncached_decode, model)),
  }
  rows = []
  for b in map(int, _BATCH_SIZES.value):
    labels = jnp.arange(b, dtype=jnp.int32) % config.model.num_classes
    rng = jax.random.PRNGKey(1)
    z = 0.7 * jax.random.normal(rng, (b, model.num_tokens, model.token_dim))
    args = {"ar": (params, rng, labels), "flow": (params, z, labels)}
    for stage in ("ar", "flow"):
      per_s = {}
      for kind in ("cached", "uncached"):
        fn = fns[f"{stage}_{kind}"]
        out = jax.block_until_ready(fn(*args[stage]))  # compile
        seconds = bench_lib.median_seconds(lambda: fn(*args[stage]),
                                           _REPEATS.value)
        per_s[kind] = (b / seconds, out)
      gap = jnp.abs(per_s["cached"][1] - per_s["uncached"][1]).max()
      diff = "" if stage == "ar" else f"{float(gap):.1e}"
      name = "AR decoding (latents)" if stage == "ar" else "flow inverse"
      rows.append([name, b, per_s["cached"][0], per_s["uncached"][0],
                   f"{per_s['cached'][0] / per_s['uncached'][0]:.1f}x", diff])
  print(f"Device: {bench_lib.device_name()}; size {_SIZE.value}, "
        f"N = {model.num_tokens} tokens")
  print(bench_lib.table(["stage", "batch", "cached images/s",
                         "uncached images/s", "cached speed-up",
                         "max abs(cached - uncached)"], rows))


if __name__ == "__main__":
  app.run(main)
