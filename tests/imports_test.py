"""The import graph of farmer_jax/ has no cycle and flows one way.

Parsed with `ast` (nothing is imported), so every import counts, also one
hidden inside a function: a lazy import that breaks a cycle is still a
cycle.
"""
import ast
import os

import helpers

PACKAGE = os.path.join(helpers.REPO, "farmer_jax")
# Modules that train (or distil): inference-side modules must not import them.
TRAINING = {"farmer_jax.train", "farmer_jax.distill", "farmer_jax.loop",
            "farmer_jax.main"}
INFERENCE = ("farmer_jax.inference", "farmer_jax.sample",
             "farmer_jax.evaluate", "farmer_jax.score",
             "farmer_jax.diagnose", "farmer_jax.metrics",
             "farmer_jax.checkpointing", "farmer_jax.sampling",
             "farmer_jax.decoders", "farmer_jax.pretrained")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, helpers.REPO)[:-len(".py")]
  name = rel.replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def import_graph() -> dict:
  """`{module: {farmer_jax modules it imports}}` for every file."""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        modules[_module_name(os.path.join(root, f))] = os.path.join(root, f)
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        # `from farmer_jax import x`: x is a module, or a name of `base`.
        targets = [f"{node.module}.{a.name}"
                   if f"{node.module}.{a.name}" in modules else node.module
                   for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def find_cycle(graph: dict):
  """One cycle as a list of modules, or None."""
  state = {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, stack)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
      "a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_farmer_jax_imports_have_no_cycle():
  graph = import_graph()
  assert "farmer_jax.train" in graph and graph["farmer_jax.train"]
  assert find_cycle(graph) is None, find_cycle(graph)


def test_inference_side_never_imports_training():
  graph = import_graph()

  def reach(name):
    seen, todo = set(), [name]
    while todo:
      for dep in graph[todo.pop()]:
        if dep not in seen:
          seen.add(dep)
          todo.append(dep)
    return seen

  for name in INFERENCE:
    assert not reach(name) & TRAINING, (name, reach(name) & TRAINING)


def test_models_import_nothing_outside_models():
  for name, deps in import_graph().items():
    if name.startswith("farmer_jax.models"):
      assert all(d.startswith("farmer_jax.models") for d in deps), (name, deps)
