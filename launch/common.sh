# shellcheck shell=bash
# Shared by the launch scripts (create, setup, run, logs, stop); sourced only.
#
# Every setting comes from a flag or from the environment variable of the
# same name (--tpu-name=NAME or TPU_NAME=NAME); a flag wins over the variable.
# With --dry-run (or DRY_RUN=1) every gcloud command is printed on one line,
# prefixed "+ " and quoted so that it can be pasted into a shell, instead of
# being run. Messages and warnings go to stderr, so stdout holds only the
# commands.

set -euo pipefail

# Cloud TPU settings (the names the Cloud TPU documentation uses).
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
# QUEUED=1: the TPU was (or is to be) made through a queued resource whose id
# is QUEUED_RESOURCE (default: TPU_NAME, which is also the node id).
QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-}"
DRY_RUN="${DRY_RUN:-0}"

# Where the code, the virtualenv and the logs live on every TPU VM. Relative
# paths are taken from the remote $HOME.
REMOTE_DIR="${REMOTE_DIR:-farmer_jax}"
VENV_DIR="${VENV_DIR:-farmer_venv}"
LOG_DIR="${LOG_DIR:-farmer_logs}"

# The repository root on this machine (the parent of launch/).
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

# Flag tables every script starts from: "flag-name=VARIABLE" for flags that
# take a value; switches may end in ":VALUE" (default 1) to set that value.
# shellcheck disable=SC2034  # used by the scripts that source this file
TPU_FLAGS=(project=PROJECT zone=ZONE tpu-name=TPU_NAME)
# shellcheck disable=SC2034  # used by the scripts that source this file
COMMON_SWITCHES=(dry-run=DRY_RUN)

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

warn() {
  printf 'warning: %s\n' "$*" >&2
}

note() {
  printf '%s\n' "$*" >&2
}

# is_true VALUE: true for 1/true/yes/on (any case), false otherwise.
is_true() {
  case "$(printf '%s' "${1:-}" | tr '[:upper:]' '[:lower:]')" in
    1 | true | yes | on) return 0 ;;
    *) return 1 ;;
  esac
}

# require VAR...: exit with a message naming the flag and the variable for
# the first one that is empty.
require() {
  local var flag
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      flag="$(printf '%s' "$var" | tr '[:upper:]_' '[:lower:]-')"
      die "$var is not set; pass --$flag=${var##*_} or export $var"
    fi
  done
}

# parse_flags ARGS...: sets the variables named in the caller's VALUE_FLAGS
# and SWITCHES tables. Words after "--" are kept in EXTRA_ARGS. -h/--help
# calls the caller's usage function and exits. The caller may add
# UNKNOWN_FLAG_HINT to the message for a flag it does not know.
# shellcheck disable=SC2034  # EXTRA_ARGS is read by the caller
parse_flags() {
  EXTRA_ARGS=()
  while (($#)); do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        EXTRA_ARGS=("$@")
        return 0
        ;;
      --?*)
        parse_one_flag "$@"
        shift "$FLAG_WORDS"
        ;;
      *) die "unexpected argument '$1' (see --help)" ;;
    esac
  done
}

# parse_one_flag ARGS...: handles the flag in $1 (and its value in $2 when
# written "--flag VALUE"); sets FLAG_WORDS to the number of words used.
parse_one_flag() {
  local name="${1#--}" value="" has_value=0 spec var
  if [[ "$name" == *=* ]]; then
    value="${name#*=}"
    name="${name%%=*}"
    has_value=1
  fi
  FLAG_WORDS=1
  for spec in "${VALUE_FLAGS[@]}"; do
    [[ "${spec%%=*}" == "$name" ]] || continue
    if ((!has_value)); then
      (($# >= 2)) || die "--$name needs a value"
      value="$2"
      FLAG_WORDS=2
    fi
    printf -v "${spec#*=}" '%s' "$value"
    return 0
  done
  for spec in "${SWITCHES[@]}"; do
    [[ "${spec%%=*}" == "$name" ]] || continue
    ((!has_value)) || die "--$name takes no value"
    var="${spec#*=}"
    value=1
    if [[ "$var" == *:* ]]; then
      value="${var#*:}"
      var="${var%%:*}"
    fi
    printf -v "$var" '%s' "$value"
    return 0
  done
  die "unknown flag --$name (see --help)${UNKNOWN_FLAG_HINT:-}"
}

# shell_quote WORD: WORD as one shell word, bare when that is safe and
# single-quoted otherwise. "--flag=value" keeps the flag bare.
shell_quote() {
  local word="$1" prefix=""
  if [[ "$word" =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

# quote_words WORDS...: the words quoted and joined by single spaces.
quote_words() {
  local word sep=""
  for word in "$@"; do
    printf '%s%s' "$sep" "$(shell_quote "$word")"
    sep=" "
  done
}

# run_cmd COMMAND...: prints the command under --dry-run; otherwise echoes it
# to stderr and runs it.
run_cmd() {
  if is_true "$DRY_RUN"; then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    note "+ $(quote_words "$@")"
    "$@"
  fi
}

# remote_path PATH: PATH for a remote shell command; a relative PATH (or one
# starting with ~/) is anchored at the remote "$HOME", left unexpanded here.
remote_path() {
  local path="${1#\~/}"
  if [[ "$path" == /* ]]; then
    shell_quote "$path"
  else
    printf '%s/%s' "\"\$HOME\"" "$(shell_quote "$path")"
  fi
}

# remote_script SETUP... < BODY: one line of shell for `tpu-vm ssh --command`.
# SETUP words are already shell syntax (name=$(shell_quote VALUE), or
# `set -- ...`) and come first; BODY lines from stdin follow. Each BODY line
# must be a complete command; blank lines and "#" comment lines are dropped.
# Keeping it on one line keeps the --dry-run output one command per line.
remote_script() {
  local out="" line
  for line in "$@"; do
    out+="$line; "
  done
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"
    if [[ -z "$line" || "$line" == "#"* ]]; then
      continue
    fi
    # "cmd &" already ends the command; "cmd &;" would be a syntax error.
    if [[ "$line" == *"&" && "$line" != *"&&" ]]; then
      out+="$line "
    else
      out+="$line; "
    fi
  done
  out="${out%; }"
  printf '%s' "${out% }"
}

# tpu_ssh WORKER COMMAND: runs the shell COMMAND on one worker or on "all".
tpu_ssh() {
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" \
    --project="$PROJECT" --zone="$ZONE" --worker="$1" --command="$2"
}

# default_runtime_version ACCELERATOR_TYPE: the TPU VM image the Cloud TPU
# guides use for that TPU generation (empty if unknown).
default_runtime_version() {
  case "$1" in
    v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
  esac
}

# slice_shape ACCELERATOR_TYPE: sets SLICE_CHIPS and SLICE_HOSTS (TPU VMs,
# i.e. JAX processes), or 0 and 0 for a type this table does not know.
# v4 and v5p names count TensorCores (2 per chip); v5litepod and v6e names
# count chips. Multi-host slices have 4 chips per VM; a v5e/v6e slice of up
# to 8 chips is a single VM. See launch/README.md for the sources.
# shellcheck disable=SC2034  # SLICE_* are read by the caller
slice_shape() {
  local family="${1%-*}" count="${1##*-}"
  SLICE_CHIPS=0
  SLICE_HOSTS=0
  [[ "$count" =~ ^[0-9]+$ ]] || return 0
  case "$family" in
    v4 | v5p)
      SLICE_CHIPS=$((count / 2))
      SLICE_HOSTS=$(((SLICE_CHIPS + 3) / 4))
      ;;
    v5litepod | v6e)
      SLICE_CHIPS=$count
      if ((count <= 8)); then
        SLICE_HOSTS=1
      else
        SLICE_HOSTS=$((count / 4))
      fi
      ;;
  esac
}
