#!/bin/bash
# The GPU checks behind docs/benchmarks.md (GPU rows): correctness against the
# CPU, the real program end to end, speed beside the PyTorch reference (eager
# and torch.compile), the decoders (exact, Jacobi, student) on the shipped
# digits run and at an ImageNet-64 shape, the FARMER-1.1B-shaped train
# step's model FLOP utilisation, and the 8xH100 launch rows compiled by the
# GPU compiler. Run from the repository
# root on a machine with one NVIDIA GPU, JAX with CUDA, Flax, Optax, Orbax
# and PyTorch installed; grain, ml_collections and clu may come as wheels in
# .whl/ (installed to /tmp/site). Logs go to $OUT (default: gpu_logs/).
#
#   bash benchmarks/gpu_checks.sh                 # every step, in order
#   bash benchmarks/gpu_checks.sh aot_memory      # named steps only
#
# Each step's limit is its measured or estimated time with room; together
# they exceed one 600 s device call, so a call names the steps it runs, the
# new measurements first:
#   bash benchmarks/gpu_checks.sh gpu_info mfu decoders_in64      # <= 440 s
#   bash benchmarks/gpu_checks.sh decoders torch_compile         # <= 320 s
#   bash benchmarks/gpu_checks.sh aot_memory                     # <= 400 s
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # name, seconds, command...: logged to $OUT/name.log, time-limited.
  local name=$1 limit=$2
  shift 2
  echo "=== $name $(date +%T): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E "^[IW][0-9]{4} |^WARNING" "$OUT/$name.log" | tail -40
  echo "=== $name rc=$rc $(date +%T)"
}

gpu_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint, grain; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, jax.devices())"
}

[ $# -gt 0 ] || set -- gpu_info accelerator_check main_tiny train_throughput \
  torch_reference torch_compile decoders decoders_in64 mfu aot_memory
for what in "$@"; do
  case "$what" in
    gpu_info) gpu_info ;;
    accelerator_check) step accelerator_check 150 python3 \
      benchmarks/accelerator_check.py --rows=digits,refS ;;
    main_tiny) step main_tiny 100 python3 -m farmer_jax.main \
      --config=configs/digits.py:tiny --workdir="$(mktemp -d)" ;;  # fresh
    train_throughput) step train_throughput 80 python3 \
      benchmarks/train_throughput.py --sizes=refS,refM --priors=gaussian \
      --batch_size=0 --steps=20 --warmup=3 --matmul_n=8192 \
      --overrides=model.matmul_precision=default ;;
    torch_reference) step torch_reference 45 python3 \
      benchmarks/torch_reference.py --device=cuda --tf32 --rows=refS,refM \
      --steps=20 --warmup=3 ;;
    torch_compile) step torch_compile 120 python3 \
      benchmarks/torch_reference.py --device=cuda --tf32 --rows=refS,refM \
      --steps=20 --warmup=3 --compile ;;  # the peer's best, not eager
    decoders) step decoders 200 python3 benchmarks/decoders.py \
      --workdir="$(python3 -c 'from farmer_jax import pretrained
print(pretrained.workdir("digits", "/tmp/pretrained_digits"))')" \
      --student_workdir=/tmp/pretrained_digits/distill \
      --jacobi=7:1e-3,49:1e-3,49:1e-4 --batch_sizes=1,16,256 \
      --num_samples=500 ;;  # the shipped digits run and its student
    # Speed and convergence at ImageNet 64 (B: 8 flow blocks of 2 x 768,
    # N = 256, bf16), random weights perturbed by 0.003: on a CPU a
    # 768-wide flow so perturbed converges in 3-4 iterations per chunk at
    # tol 1e-2 (bf16's resolution is 3.9e-3; docs/benchmarks.md).
    decoders_in64) step decoders_in64 240 python3 benchmarks/decoders.py \
      --config=configs/imagenet.py:res=64,size=B --perturb=0.003 \
      --jacobi=16:1e-2,256:1e-2,256:4e-3 --batch_sizes=1,16 \
      --num_samples=64 ;;
    mfu) step mfu 200 python3 benchmarks/mfu.py \
      --config=configs/imagenet.py:res=256,size=1.1B \
      --config.model.af_blocks=4 --config.batch_size=64 --steps=300 ;;
    aot_memory) step aot_memory 400 python3 benchmarks/aot_memory.py --gpu \
      --rows="${AOT_ROWS:-1.1B/16@8xH100,1.9B/16@8xH100}" ;;
    *) echo "unknown step $what"; exit 2 ;;
  esac
done
