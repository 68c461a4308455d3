"""README's Python API example runs and shows an exact inverse."""
import os
import re
import subprocess
import sys

import helpers


def test_readme_python_example_runs():
  readme = open(os.path.join(helpers.REPO, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks, "README has no python example"
  out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": helpers.REPO})
  assert out.returncode == 0, out.stderr[-2000:]
  last = out.stdout.strip().splitlines()[-1]
  max_err = float(last.rsplit(" ", 1)[1])
  assert max_err < 1e-4
