#!/usr/bin/env bash
# Starts `python -m farmer_jax.main --config=CONFIG --workdir=WORKDIR ...` on
# every worker of the slice at once (each is one JAX process), detached with
# nohup + setsid so it outlives the ssh session. Each worker logs to
# LOG_DIR/<UTC time>_<hostname>.log on its own disk, with LOG_DIR/latest.log
# pointing at the newest; launch/logs.sh tails it.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"

usage() {
  cat <<'EOF'
Usage: launch/run.sh --config=CONFIG --workdir=WORKDIR [flags] [-- trainer flags]

Starts training on every worker (--worker=all) in the background.

Flags (each also read from the environment variable in brackets):
  --config=CONFIG            e.g. configs/imagenet.py:res=256,size=1.1B [CONFIG] (required)
  --workdir=WORKDIR          checkpoints and metrics, gs://BUCKET/PATH on a
                             multi-host slice [WORKDIR] (required)
  --project=PROJECT          Google Cloud project [PROJECT] (required)
  --zone=ZONE                zone of the TPU [ZONE] (required)
  --tpu-name=NAME            TPU VM (node) name [TPU_NAME] (required)
  --accelerator-type=TYPE    e.g. v4-32; only used to tell single- from
                             multi-host for the WORKDIR check [ACCELERATOR_TYPE]
  --remote-dir=DIR           code directory on the workers [REMOTE_DIR] (farmer_jax)
  --venv-dir=DIR             virtualenv on the workers [VENV_DIR] (farmer_venv)
  --log-dir=DIR              log directory on the workers [LOG_DIR] (farmer_logs)
  --dry-run                  print the gcloud commands instead of running them [DRY_RUN=1]
  -h, --help                 show this help

Words after "--" go to the trainer unchanged, e.g.
  launch/run.sh --config=configs/imagenet.py:res=256,size=1.1B \
    --workdir=gs://my-bucket/farmer/run1 -- --config.batch_size=1024

A run that is already going on any worker is an error; stop it first with
launch/stop.sh. Relative directories are under the remote $HOME.
EOF
}

VALUE_FLAGS=("${TPU_FLAGS[@]}" config=CONFIG workdir=WORKDIR
  accelerator-type=ACCELERATOR_TYPE remote-dir=REMOTE_DIR venv-dir=VENV_DIR
  log-dir=LOG_DIR)
SWITCHES=("${COMMON_SWITCHES[@]}")
UNKNOWN_FLAG_HINT="; flags for the trainer (--config.KEY=VALUE, ...) go after --"
parse_flags "$@"
require PROJECT ZONE TPU_NAME CONFIG WORKDIR

# Every worker must read and write the same checkpoints, so a local path is
# only right on a single-host slice.
if [[ "$WORKDIR" != gs://* ]]; then
  slice_shape "$ACCELERATOR_TYPE"
  if ((SLICE_HOSTS != 1)); then
    warn "WORKDIR=$WORKDIR is not a gs:// path; on a multi-host slice each worker would write its own local copy and no worker could resume the others' checkpoints"
  fi
fi

logs="logs=$(remote_path "$LOG_DIR")"

# Refuse to start anywhere before starting everywhere: a second trainer
# could not get the TPU, and a partial start would leave JAX waiting.
tpu_ssh all "$(remote_script "$logs" <<'EOF'
if [ -f "$logs/farmer.pid" ] && kill -0 "$(cat "$logs/farmer.pid")" 2>/dev/null; then echo "error: $(hostname): farmer_jax is already running (pid $(cat "$logs/farmer.pid")); stop it with launch/stop.sh" >&2; exit 1; fi
EOF
)"

trainer=(-m farmer_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed
  ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
tpu_ssh all "$(remote_script "$logs" "dir=$(remote_path "$REMOTE_DIR")" \
  "python=$(remote_path "$VENV_DIR")/bin/python" "set -- $(quote_words "${trainer[@]}")" <<'EOF'
set -eu
mkdir -p "$logs"
log="$logs/$(date -u +%Y%m%dT%H%M%SZ)_$(hostname).log"
ln -sfn "$log" "$logs/latest.log"
cd "$dir"
# Unbuffered, so that the log shows progress as it happens.
export PYTHONUNBUFFERED=1
# setsid: the trainer leads its own process group, which stop.sh signals as a whole.
nohup setsid bash -c 'echo $$ > "$0"; exec "$@"' "$logs/farmer.pid" "$python" "$@" >"$log" 2>&1 </dev/null &
echo "$(hostname): started; log $log"
EOF
)"
if ! is_true "$DRY_RUN"; then
  note "Follow worker 0 with: launch/logs.sh (same PROJECT, ZONE, TPU_NAME)"
fi
