"""Executes notebooks/evaluate.ipynb top to bottom against a trained tiny run."""
import os

import nbclient
import nbformat

import helpers


def test_evaluation_notebook_runs(trained_workdir, monkeypatch):
  path = os.path.join(helpers.REPO, "notebooks", "evaluate.ipynb")
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("FARMER_WORKDIR", trained_workdir)
  monkeypatch.setenv("FARMER_NUM_SAMPLES", "20")
  monkeypatch.setenv("XLA_FLAGS", helpers.xla_flags(2))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": helpers.REPO}})
  client.execute()  # raises CellExecutionError if any cell fails
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "bits/dim  uniform noise" in outputs
  assert "bpd_stderr" in outputs
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the sample grid and the CFG sweep plot
