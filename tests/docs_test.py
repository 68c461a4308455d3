"""The project's text explains itself: a short README, no tracker references,
no broken relative links.

README.md is a manual a newcomer reads in minutes; the measured record lives
in docs/benchmarks.md. Comments, docstrings and docs say what and why: a
pointer to a tracker issue the reader cannot see explains nothing.
"""
import glob
import os
import re

import pytest

# The repository root (pure Python: this file needs neither JAX nor helpers).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 350
# The word issue or issues followed by a number, GH-<n>, PR #<n>. This
# file's examples are built from pieces so that it does not match itself.
TRACKER = re.compile(r"\b[Ii]ssues? ?#?\d+|\bGH-\d+|\bPR ?#\d+")
TEXT_DIRS = ("farmer_jax", "configs", "tests", "benchmarks", "launch",
             "notebooks")
TEXT_EXTENSIONS = (".py", ".sh", ".ipynb", ".md")


def _docs():
  return ([os.path.join(REPO, "README.md")]
          + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
          + [os.path.join(REPO, "launch", "README.md"),
             os.path.join(REPO, "benchmarks", "README.md")])


def _project_files():
  files = list(_docs()) + [os.path.join(REPO, "setup.py")]
  for d in TEXT_DIRS:
    for root, _, names in os.walk(os.path.join(REPO, d)):
      files += [os.path.join(root, n) for n in names
                if n.endswith(TEXT_EXTENSIONS)]
  return sorted(set(files))


def test_readme_is_short():
  with open(os.path.join(REPO, "README.md")) as f:
    lines = f.read().splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move "
      "measured records to docs/benchmarks.md.")


def test_the_pattern_finds_tracker_references():
  assert TRACKER.search("as in " + "issue" + " 13's table")
  assert TRACKER.search("see " + "GH" + "-12")
  assert not TRACKER.search("no issue with 13 tokens")


def test_nothing_names_a_tracker_issue():
  hits = []
  for path in _project_files():
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if TRACKER.search(line):
          hits.append(f"{os.path.relpath(path, REPO)}:{number}: "
                      f"{line.strip()[:80]}")
  assert not hits, "Tracker references:\n" + "\n".join(hits)


LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](path) and ![alt](path)


def _broken_links(path):
  """Relative link targets of the markdown file `path` that do not exist."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue  # a URL (http:, https:, mailto:) or an anchor in the same file
    rel = target.split("#", 1)[0]
    if not os.path.exists(os.path.join(os.path.dirname(path), rel)):
      broken.append(target)
  return broken


def test_the_link_check_finds_missing_files(tmp_path):
  (tmp_path / "there.md").write_text("x")
  doc = tmp_path / "doc.md"
  doc.write_text("[a](there.md) ![b](gone.png) [c](there.md#part) "
                 "[d](https://example.com/x) [e](#anchor) [f](sub/none.md)")
  assert _broken_links(str(doc)) == ["gone.png", "sub/none.md"]


@pytest.mark.parametrize("doc", [os.path.relpath(d, REPO) for d in _docs()])
def test_relative_links_resolve(doc):
  broken = _broken_links(os.path.join(REPO, doc))
  assert not broken, f"{doc} links to missing files: {broken}"
