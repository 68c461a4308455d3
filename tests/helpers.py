"""Shared test helpers: config loading and random non-zero weights."""
import importlib.util
import os

import flax.linen as nn
import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "digits", arg: str = "tiny"):
  """`configs/<name>.py:get_config(arg)`, unlocked for overrides."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def randomize(params, seed: int = 0, scale: float = 0.2):
  """Adds N(0, scale^2) to every weight so no head is zero any more."""
  params = nn.meta.unbox(params)
  leaves, treedef = jax.tree.flatten(params)
  # One draw sliced over the leaves: one RNG op compiles much faster than
  # one per leaf.
  noise = jax.random.normal(jax.random.PRNGKey(seed),
                            (sum(a.size for a in leaves),))
  out, start = [], 0
  for a in leaves:
    out.append(a + scale * noise[start:start + a.size].reshape(a.shape))
    start += a.size
  return jax.tree.unflatten(treedef, out)

def init_random(model, x, labels, seed: int = 0, scale: float = 0.1):
  """`model.init` then `randomize`, both jitted (eager init is slow)."""
  @jax.jit
  def init(x, labels):
    variables = model.init({"params": jax.random.PRNGKey(seed),
                            "dropout": jax.random.PRNGKey(seed + 1)}, x, labels)
    return {"params": randomize(variables["params"], seed + 2, scale)}
  return init(x, labels)


# A tiny digits model trained once per test session and shared by every
# test that needs a trained run (sampling quality, scoring, the notebook,
# distillation): under pytest-xdist the first worker to ask trains it, the
# others wait on a file lock and reuse it.
TRAINED_STEPS = 300


def trained_tiny_config():
  config = load_config("digits", "tiny")
  config.update(dict(total_steps=TRAINED_STEPS, ckpt_every=TRAINED_STEPS,
                     eval_every=TRAINED_STEPS, log_every=50,
                     num_eval_batches=1, mesh_shape=(-1, 1, 1)))
  return config


def trained_tiny_workdir(tmp_path_factory) -> str:
  """Path of the shared trained tiny run (trains it on first use)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  from farmer_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by all workers of this session
  workdir = os.path.join(str(root), "trained_tiny")
  done = os.path.join(workdir, "DONE")
  with open(os.path.join(str(root), "trained_tiny.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.exists(done):
        train.train_and_evaluate(trained_tiny_config(), workdir)
        open(done, "w").close()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir
