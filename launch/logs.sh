#!/usr/bin/env bash
# Shows the newest training log of one worker (or of all), as written by
# launch/run.sh; by default follows it like `tail -F`.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="${WORKER:-0}"
LOG_LINES="${LOG_LINES:-100}"
FOLLOW="${FOLLOW:-1}"

usage() {
  cat <<'EOF'
Usage: launch/logs.sh [flags]

Prints the last lines of a worker's newest run log and keeps following it.

Flags (each also read from the environment variable in brackets):
  --worker=N                 worker index, or "all" [WORKER] (0)
  --lines=N                  lines of history to show [LOG_LINES] (100)
  --no-follow                print and exit instead of following [FOLLOW=0]
  --project=PROJECT          Google Cloud project [PROJECT] (required)
  --zone=ZONE                zone of the TPU [ZONE] (required)
  --tpu-name=NAME            TPU VM (node) name [TPU_NAME] (required)
  --log-dir=DIR              log directory on the workers [LOG_DIR] (farmer_logs)
  --dry-run                  print the gcloud command instead of running it [DRY_RUN=1]
  -h, --help                 show this help
EOF
}

VALUE_FLAGS=("${TPU_FLAGS[@]}" worker=WORKER lines=LOG_LINES log-dir=LOG_DIR)
SWITCHES=("${COMMON_SWITCHES[@]}" no-follow=FOLLOW:0)
parse_flags "$@"
require PROJECT ZONE TPU_NAME WORKER LOG_LINES
[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || die "LOG_LINES=$LOG_LINES is not a number of lines"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "WORKER=$WORKER is neither a worker index nor all"

follow=""
if is_true "$FOLLOW"; then
  follow=" -F"
fi
tpu_ssh "$WORKER" "$(remote_script "logs=$(remote_path "$LOG_DIR")" <<EOF
if [ ! -e "\$logs/latest.log" ]; then echo "error: \$(hostname): no run log in \$logs; start one with launch/run.sh" >&2; exit 1; fi
tail -n $LOG_LINES$follow "\$logs/latest.log"
EOF
)"
