#!/usr/bin/env bash
# Creates the TPU VM slice that farmer_jax trains on: directly with
# `gcloud compute tpus tpu-vm create`, or with --queued through a queued
# resource (`gcloud compute tpus queued-resources create --node-id`), which
# waits in line for capacity instead of failing when there is none.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"

usage() {
  cat <<'EOF'
Usage: launch/create.sh [flags] [-- extra gcloud flags]

Creates a TPU VM slice (or, with --queued, a queued resource for one).

Flags (each also read from the environment variable in brackets):
  --project=PROJECT             Google Cloud project [PROJECT] (required)
  --zone=ZONE                   zone, e.g. us-central2-b [ZONE] (required)
  --tpu-name=NAME               TPU VM (node) name [TPU_NAME] (required)
  --accelerator-type=TYPE       e.g. v4-32, v5litepod-64 [ACCELERATOR_TYPE] (required)
  --runtime-version=VERSION     TPU VM image [RUNTIME_VERSION]; default from the type:
                                v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                                v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --queued                      create a queued resource instead [QUEUED=1]
  --queued-resource=ID          queued resource id [QUEUED_RESOURCE]; default TPU_NAME
  --spot                        Spot capacity (cheaper, can be preempted) [SPOT=1]
  --preemptible                 legacy preemptible TPU; not with --queued [PREEMPTIBLE=1]
  --dry-run                     print the gcloud command instead of running it [DRY_RUN=1]
  -h, --help                    show this help

Words after "--" are appended to the gcloud command (e.g. -- --internal-ips).

Example:
  PROJECT=my-proj ZONE=us-central2-b TPU_NAME=farmer-v4 \
    launch/create.sh --accelerator-type=v4-32 --queued --spot
EOF
}

VALUE_FLAGS=("${TPU_FLAGS[@]}" accelerator-type=ACCELERATOR_TYPE
  runtime-version=RUNTIME_VERSION queued-resource=QUEUED_RESOURCE)
SWITCHES=("${COMMON_SWITCHES[@]}" queued=QUEUED spot=SPOT preemptible=PREEMPTIBLE)
parse_flags "$@"

require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"
[[ -n "$RUNTIME_VERSION" ]] ||
  die "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; pass --runtime-version=VERSION or export RUNTIME_VERSION"
if is_true "$SPOT" && is_true "$PREEMPTIBLE"; then
  die "choose one of --spot and --preemptible"
fi

capacity=()
if is_true "$SPOT"; then
  capacity+=(--spot)
fi

if is_true "$QUEUED"; then
  if is_true "$PREEMPTIBLE"; then
    die "queued resources take --spot, not --preemptible"
  fi
  QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME}"
  run_cmd gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" \
    --project="$PROJECT" --zone="$ZONE" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
  if ! is_true "$DRY_RUN"; then
    note "Queued. Wait for state ACTIVE before setup.sh:"
    note "  gcloud compute tpus queued-resources describe $QUEUED_RESOURCE --project=$PROJECT --zone=$ZONE"
  fi
else
  if is_true "$PREEMPTIBLE"; then
    capacity+=(--preemptible)
  fi
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" \
    --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
fi
if ! is_true "$DRY_RUN"; then
  note "Next: launch/setup.sh, then launch/run.sh (same PROJECT, ZONE, TPU_NAME)."
fi
