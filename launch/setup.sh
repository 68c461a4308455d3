#!/usr/bin/env bash
# Prepares every worker of a TPU slice for training: puts the code in
# REMOTE_DIR (a git clone of REPO_URL, or a copy of this checkout sent with
# `tpu-vm scp`), makes a virtualenv, installs the pinned "jax[tpu]" and
# `pip install -e .`, then checks that JAX sees every chip of the slice.
#
# jax >= 0.7 needs Python >= 3.11 while the Ubuntu 22.04 TPU images ship
# 3.10, so the virtualenv is made by uv, which fetches PYTHON_VERSION when
# the image lacks it.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The jax this repository is tested with; libtpu comes with the [tpu] extra.
JAX_VERSION="${JAX_VERSION:-0.10.2}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-origin/HEAD}"
FRESH_VENV="${FRESH_VENV:-0}"
VERIFY="${VERIFY:-1}"
# The copy of this checkout, on this machine and then in the remote $HOME.
ARCHIVE="${TMPDIR:-/tmp}/farmer_jax-src.tar.gz"
REMOTE_ARCHIVE="farmer_jax-src.tar.gz"

usage() {
  cat <<'EOF'
Usage: launch/setup.sh [flags]

On every worker (--worker=all): get the code, make a virtualenv, install
"jax[tpu]==JAX_VERSION" and this package (pip install -e .), check devices.

Flags (each also read from the environment variable in brackets):
  --project=PROJECT          Google Cloud project [PROJECT] (required)
  --zone=ZONE                zone of the TPU [ZONE] (required)
  --tpu-name=NAME            TPU VM (node) name [TPU_NAME] (required)
  --repo-url=URL             git clone URL on the workers [REPO_URL]; if unset,
                             this checkout (files git does not ignore) is copied
                             with `tpu-vm scp`, uncommitted edits included
  --repo-ref=REF             commit, tag or origin/BRANCH to check out
                             [REPO_REF] (default origin/HEAD)
  --remote-dir=DIR           code directory on the workers [REMOTE_DIR] (farmer_jax)
  --venv-dir=DIR             virtualenv on the workers [VENV_DIR] (farmer_venv)
  --jax-version=VERSION      pinned jax [JAX_VERSION] (0.10.2)
  --python-version=VERSION   Python of the virtualenv [PYTHON_VERSION] (3.11)
  --fresh-venv               delete and remake the virtualenv [FRESH_VENV=1]
  --no-verify                skip the device check [VERIFY=0]
  --dry-run                  print the gcloud commands instead of running them [DRY_RUN=1]
  -h, --help                 show this help

Relative directories are under the remote $HOME.
EOF
}

VALUE_FLAGS=("${TPU_FLAGS[@]}" repo-url=REPO_URL repo-ref=REPO_REF
  remote-dir=REMOTE_DIR venv-dir=VENV_DIR jax-version=JAX_VERSION
  python-version=PYTHON_VERSION)
SWITCHES=("${COMMON_SWITCHES[@]}" fresh-venv=FRESH_VENV no-verify=VERIFY:0)
parse_flags "$@"
require PROJECT ZONE TPU_NAME JAX_VERSION PYTHON_VERSION REMOTE_DIR VENV_DIR
case "${REMOTE_DIR#\~/}" in
  "" | . | ./ | / | "~" | ..*) die "REMOTE_DIR=$REMOTE_DIR would replace a directory that is not farmer_jax's own" ;;
esac

code_dir="dir=$(remote_path "$REMOTE_DIR")"
venv_dir="venv=$(remote_path "$VENV_DIR")"

# pack_source: this checkout's files that git does not ignore, into ARCHIVE.
pack_source() {
  local list=(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)
  local pack=(tar -czf "$ARCHIVE" -C "$REPO_ROOT" --null -T -)
  if is_true "$DRY_RUN"; then
    printf '+ %s | %s\n' "$(quote_words "${list[@]}")" "$(quote_words "${pack[@]}")"
    return 0
  fi
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout; pass --repo-url=URL or export REPO_URL"
  note "+ $(quote_words "${list[@]}") | $(quote_words "${pack[@]}")"
  "${list[@]}" | "${pack[@]}"
}

copy_source() {
  pack_source
  if ! is_true "$DRY_RUN"; then
    trap 'rm -f "$ARCHIVE"' EXIT
  fi
  run_cmd gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:$REMOTE_ARCHIVE" \
    --project="$PROJECT" --zone="$ZONE" --worker=all
  # Unpack beside the installed copy and swap, so files deleted here go there too.
  tpu_ssh all "$(remote_script "$code_dir" "archive=$(remote_path "$REMOTE_ARCHIVE")" <<'EOF'
set -eu
rm -rf "$dir.new"
mkdir -p "$dir.new"
tar -xzf "$archive" -C "$dir.new"
rm -rf "$dir"
mv "$dir.new" "$dir"
rm -f "$archive"
echo "$(hostname): code in $dir"
EOF
)"
}

clone_source() {
  tpu_ssh all "$(remote_script "$code_dir" "url=$(shell_quote "$REPO_URL")" \
    "ref=$(shell_quote "$REPO_REF")" <<'EOF'
set -eu
if [ -e "$dir" ] && [ ! -d "$dir/.git" ]; then echo "error: $(hostname): $dir exists and is not a git clone; remove it or leave REPO_URL unset" >&2; exit 1; fi
if [ ! -d "$dir/.git" ]; then git clone --quiet "$url" "$dir"; fi
git -C "$dir" fetch --quiet --tags origin
git -C "$dir" checkout --quiet --detach "$ref"
echo "$(hostname): $dir at $(git -C "$dir" log -1 --format='%h %s')"
EOF
)"
}

install_env() {
  local fresh=0
  if is_true "$FRESH_VENV"; then
    fresh=1
  fi
  tpu_ssh all "$(remote_script "$code_dir" "$venv_dir" "fresh=$fresh" \
    "jax_version=$(shell_quote "$JAX_VERSION")" \
    "python_version=$(shell_quote "$PYTHON_VERSION")" <<'EOF'
set -eu
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; fi
if [ "$fresh" = 1 ]; then rm -rf "$venv"; fi
if [ ! -x "$venv/bin/python" ]; then uv venv --quiet --seed --python "$python_version" "$venv"; fi
cd "$dir"
# One resolve for both, so the package's own jax requirement cannot move the pin.
uv pip install --quiet --python "$venv/bin/python" "jax[tpu]==$jax_version" -e .
echo "$(hostname): $("$venv/bin/python" -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)')"
EOF
)"
}

# verify_devices: every worker must start JAX together, as in training.
verify_devices() {
  tpu_ssh all "$(remote_script "$venv_dir" <<'EOF'
"$venv/bin/python" -c 'import socket, jax; jax.distributed.initialize(); print(socket.gethostname(), "process", jax.process_index(), "of", jax.process_count(), "| devices: local", jax.local_device_count(), "global", jax.device_count())'
EOF
)"
}

if [[ -n "$REPO_URL" ]]; then
  clone_source
else
  copy_source
fi
install_env
if is_true "$VERIFY"; then
  verify_devices
fi
if ! is_true "$DRY_RUN"; then
  note "Next: launch/run.sh --config=... --workdir=gs://..."
fi
