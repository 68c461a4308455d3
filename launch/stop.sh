#!/usr/bin/env bash
# Stops training on every worker (SIGTERM to the trainer's process group,
# then SIGKILL after GRACE_SECONDS), or with --delete deletes the TPU VM, or
# the queued resource and its TPU with --queued.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DELETE="${DELETE:-0}"
YES="${YES:-0}"
GRACE_SECONDS="${GRACE_SECONDS:-30}"

usage() {
  cat <<'EOF'
Usage: launch/stop.sh [flags]

Without --delete: stops the run that launch/run.sh started, on all workers.
With --delete: deletes the TPU VM (the run dies with it); add --queued to
delete the queued resource together with its TPU (--force), which is how a
TPU made with `create.sh --queued` should go.

Flags (each also read from the environment variable in brackets):
  --project=PROJECT          Google Cloud project [PROJECT] (required)
  --zone=ZONE                zone of the TPU [ZONE] (required)
  --tpu-name=NAME            TPU VM (node) name [TPU_NAME] (required)
  --grace-seconds=N          wait this long after SIGTERM before SIGKILL
                             [GRACE_SECONDS] (30)
  --log-dir=DIR              log directory on the workers [LOG_DIR] (farmer_logs)
  --delete                   delete the TPU instead [DELETE=1]
  --queued                   with --delete: delete the queued resource [QUEUED=1]
  --queued-resource=ID       its id [QUEUED_RESOURCE] (default TPU_NAME)
  --yes                      delete without gcloud's confirmation prompt [YES=1]
  --dry-run                  print the gcloud command instead of running it [DRY_RUN=1]
  -h, --help                 show this help
EOF
}

VALUE_FLAGS=("${TPU_FLAGS[@]}" grace-seconds=GRACE_SECONDS log-dir=LOG_DIR
  queued-resource=QUEUED_RESOURCE)
SWITCHES=("${COMMON_SWITCHES[@]}" delete=DELETE queued=QUEUED yes=YES)
parse_flags "$@"
require PROJECT ZONE TPU_NAME
[[ "$GRACE_SECONDS" =~ ^[0-9]+$ ]] || die "GRACE_SECONDS=$GRACE_SECONDS is not a number of seconds"

quiet=()
if is_true "$YES"; then
  quiet=(--quiet)
fi

if is_true "$DELETE"; then
  if is_true "$QUEUED"; then
    run_cmd gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE:-$TPU_NAME}" \
      --project="$PROJECT" --zone="$ZONE" --force ${quiet[@]+"${quiet[@]}"}
  else
    run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" \
      --project="$PROJECT" --zone="$ZONE" ${quiet[@]+"${quiet[@]}"}
  fi
  exit 0
fi

tpu_ssh all "$(remote_script "pidfile=$(remote_path "$LOG_DIR")/farmer.pid" \
  "grace=$GRACE_SECONDS" <<'EOF'
if [ ! -f "$pidfile" ]; then echo "$(hostname): no run recorded"; exit 0; fi
pid="$(cat "$pidfile")"
# The negative pid means the whole process group: the trainer and its data workers.
alive() { kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; }
if ! alive; then echo "$(hostname): pid $pid had already exited"; rm -f "$pidfile"; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
waited=0
while alive && [ "$waited" -lt "$grace" ]; do sleep 1; waited=$((waited + 1)); done
if alive; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; echo "$(hostname): killed pid $pid after ${grace}s"; else echo "$(hostname): stopped pid $pid"; fi
rm -f "$pidfile"
EOF
)"
