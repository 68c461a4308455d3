r"""Pretrained runs that ship with the package, usable like a workdir.

A pretrained run is a small workdir inside the package
(`farmer_jax/assets/pretrained/<name>/`): the run's `config.json`, one Orbax
checkpoint step holding only the EMA parameters and the model config, the
sample-quality classifier's cache (`classifier/`, so `evaluate` does not
retrain it), its distilled one-step student where one was exported
(`distill/`, the student's EMA parameters: `--decoder=student` reads it
there by default) and `pretrained.json` (where it came from and what it
measured). No optimizer state and no data iterator: it can be sampled,
evaluated and scored, not resumed.

`workdir(name)` copies it to a writable folder once (default
`~/.cache/farmer_jax/pretrained/<name>`, or `$FARMER_JAX_CACHE/<name>`) and
returns that folder, which then behaves like any training run's workdir:
`inference.restore(pretrained.workdir("digits"))` reads its EMA parameters
with the same params-only restore as a trained workdir, and `evaluate`
writes its JSON and caches beside them. The CLIs take `--pretrained=digits`
in place of `--workdir`.

Regenerate the shipped digits run from README's first command:

  python -m farmer_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m farmer_jax.evaluate --workdir=workdirs/digits --sweep --num_samples=500
  python -m farmer_jax.main --config=configs/digits_distill.py \
      --workdir=workdirs/digits_student
  python -m farmer_jax.pretrained --export=digits --workdir=workdirs/digits \
      --student_workdir=workdirs/digits_student
"""
import hashlib
import os
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax

from farmer_jax import checkpointing
from farmer_jax import config_lib
from farmer_jax import fileio
from farmer_jax import inference

# The names `--pretrained` accepts: each a folder of farmer_jax/assets/pretrained/.
NAMES = ("digits",)
INFO_FILE = "pretrained.json"
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "assets", "pretrained")
# What an export copies from the source workdir besides the parameters.
_CLASSIFIER_DIR = "classifier"
# Where an export writes the student: `decoders.make_decoder`'s default
# student workdir, `<workdir>/distill`.
STUDENT_DIR = "distill"


def packaged_dir(name: str) -> str:
  """The read-only folder of pretrained run `name` inside the package.

  Raises:
    ConfigError: `name` is not a shipped run, or its files are missing.
  """
  if name not in NAMES:
    raise config_lib.ConfigError(
        f"--pretrained={name!r}: the package ships {list(NAMES)}.")
  path = os.path.join(_PACKAGE_DIR, name)
  if not (fileio.path(path) / INFO_FILE).exists():
    raise config_lib.ConfigError(
        f"The pretrained run {name!r} is not in {path} (an install without "
        "package data?). Reinstall farmer_jax, or regenerate it: python -m "
        f"farmer_jax.pretrained --export={name} --workdir=W.")
  return path


def _files(root: str) -> list:
  """Relative paths of every file under `root`, sorted."""
  def walk(d):
    for p in d.iterdir():
      yield from (walk(p) if p.is_dir() else [p])
  base = fileio.path(root)
  return sorted(str(p.relative_to(base)) for p in walk(base))


def _digest(root: str) -> str:
  """SHA-256 over the shipped files' names and bytes (identifies a version)."""
  h = hashlib.sha256()
  for rel in _files(root):
    h.update(rel.encode() + b"\0")
    h.update((fileio.path(root) / rel).read_bytes())
  return h.hexdigest()


def default_dir(name: str) -> str:
  """Where `workdir(name)` copies the run when no folder is given."""
  cache = os.environ.get("FARMER_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "farmer_jax", "pretrained")
  return os.path.join(cache, name)


def workdir(name: str, dest: Optional[str] = None) -> str:
  """A writable workdir holding pretrained run `name`; returns its path.

  Copies the packaged files to `dest` (default `default_dir(name)`) unless
  they are there already. A `dest` that holds any other run is refused, so
  a user's training run is never overwritten.

  Raises:
    ConfigError: unknown name, or `dest` holds a different run.
  """
  src = packaged_dir(name)
  dest = dest or default_dir(name)
  digest = _digest(src)
  mark = fileio.path(dest) / ".pretrained_digest"
  if mark.exists():
    if fileio.read_text(mark).strip() == digest:
      return dest
    logging.info("%s holds another version of pretrained %r: updating it.",
                 dest, name)
  elif (fileio.path(dest) / checkpointing.CONFIG_FILE).exists():
    raise config_lib.ConfigError(
        f"{dest} already holds a run that is not pretrained {name!r}: pass "
        "an empty or new folder (or none, for the default cache).")
  for rel in _files(src):
    fileio.write_bytes(fileio.path(dest) / rel,
                       (fileio.path(src) / rel).read_bytes())
  fileio.write_text(mark, digest + "\n", atomic=True)  # marks the copy done
  logging.info("Pretrained %r copied to %s.", name, dest)
  return dest


def resolve(workdir_flag: Optional[str], pretrained_flag: Optional[str]
            ) -> str:
  """The workdir a CLI works on: `--workdir`, or `--pretrained` copied there.

  With both, the pretrained run is copied into `--workdir`; with only
  `--pretrained`, into its default cache folder.

  Raises:
    app.UsageError: neither flag is given.
  """
  if pretrained_flag:
    return workdir(pretrained_flag, workdir_flag or None)
  if not workdir_flag:
    raise app.UsageError(
        "Pass --workdir=W (a training run) or --pretrained="
        f"{'|'.join(NAMES)} (a run shipped with the package).")
  return workdir_flag


def define_workdir_flags() -> None:
  """`--workdir` and `--pretrained=NAME` for a CLI that reads a run; its
  `main` calls `resolve(FLAGS.workdir, FLAGS.pretrained)`."""
  flags.DEFINE_string("workdir", None, "The training run's --workdir (with "
                      "--pretrained: where to copy the pretrained run).")
  flags.DEFINE_enum(
      "pretrained", None, list(NAMES), "A run shipped with the package, "
      "instead of a training run: copied once to --workdir, or to "
      "~/.cache/farmer_jax/pretrained/NAME without it.")


def export(workdir_path: str, out: str, step: Optional[int] = None,
           student_workdir: Optional[str] = None) -> dict:
  """Writes the EMA parameters of a run as a pretrained run folder `out`.

  Copies `config.json`, the classifier cache (if the run has one) and the
  latest evaluation's JSON (`eval/<step>.json`, if any) into
  `pretrained.json`; with `student_workdir` (the run's distillation), the
  student's latest EMA parameters into `out/distill`.

  Returns:
    The `pretrained.json` written.
  """
  run = inference.restore(workdir_path, step)
  src = fileio.path(workdir_path)
  checkpointing.save_params(out, run.step, run.variables["params"],
                            run.config)
  checkpointing.save_config(run.config, out)
  clf = src / _CLASSIFIER_DIR
  if clf.exists():
    for f in clf.iterdir():
      fileio.write_bytes(fileio.path(out) / _CLASSIFIER_DIR / f.name,
                         f.read_bytes())
  evaluation = src / "eval" / f"{run.step}.json"
  num_params = sum(x.size for x in jax.tree.leaves(run.variables["params"]))
  info = dict(
      step=run.step, num_params=int(num_params),
      source_workdir=str(workdir_path),
      evaluation=(fileio.read_json(evaluation) if evaluation.exists()
                  else None))
  if student_workdir:
    info["student"] = _export_student(run, student_workdir,
                                      str(fileio.path(out) / STUDENT_DIR))
  fileio.write_json(fileio.path(out) / INFO_FILE, info)
  info["bytes"] = sum(fileio.size(fileio.path(out) / f) for f in _files(out))
  return info


def _export_student(run, student_workdir: str, out: str) -> dict:
  """The latest EMA parameters of `run`'s student into `out`; its record."""
  ckpt = checkpointing.Checkpointer(student_workdir, run.config,
                                    read_only=True)
  try:
    step = ckpt.latest_step()
  finally:
    ckpt.close()
  _, params = inference.load_student(run.config, student_workdir, step,
                                     mesh=run.mesh)
  checkpointing.save_params(out, step, params, run.config)
  return dict(step=int(step), source_workdir=str(student_workdir),
              num_params=int(sum(x.size for x in jax.tree.leaves(params))))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = FLAGS.out or os.path.join(_PACKAGE_DIR, FLAGS.export)
  if fileio.path(out).exists():
    raise app.UsageError(f"{out} exists: remove it first (git rm -r, or rm "
                         "-r for a scratch folder).")
  info = export(FLAGS.workdir, out, FLAGS.step, FLAGS.student_workdir)
  student = (f" and its student (step {info['student']['step']}, "
             f"{info['student']['num_params']:,} parameters)"
             if "student" in info else "")
  print(f"Wrote {out}: step {info['step']}, {info['num_params']:,} "
        f"parameters{student}, {info['bytes']:,} bytes.")


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("export", None, "Name of the pretrained run to write.")
  flags.DEFINE_string("workdir", None, "The training run to export.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("student_workdir", None, "The run's distillation "
                      "(configs/*_distill.py): its student ships too.")
  flags.DEFINE_string("out", None, "Output folder (default: the package's "
                      "farmer_jax/assets/pretrained/<export>).")
  flags.mark_flags_as_required(["export", "workdir"])
  app.run(main)
