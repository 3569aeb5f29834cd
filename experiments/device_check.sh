#!/usr/bin/env bash
# The GPU check of the dropless issue, as ONE run on a lent accelerator machine (under 8 minutes).
#
#   Here, once (a git-ignored folder of the two pure-Python wheels the GPU image lacks):
#     pip download --no-deps -d .whl ml-collections tensorboardX
#   Then, with the device tool: run(command="bash experiments/device_check.sh", carry=[".whl"],
#                                   timeout_s=540)
#
# It expects a Python with jax (CUDA plugin), flax, optax and orbax, and no network: moejax runs
# from the tree (PYTHONPATH), not installed. It prints, and copies to $OUT when set:
#   1. the MoE layer fwd+bwd, capacity (sort) vs dropless (ragged_dot, and megablox on TPU),
#      bfloat16, E = 8 / 32 / 128, k = 1 / 2, with the dense-active floor (bench_moe.py);
#   2. one train step of the ~1B-active configs/gpu_1b.py, capacity and dropless: tokens/s, MFU,
#      memory (bench_train.py);
#   3. the buffered and ragged expert-parallel transports on this machine's devices against
#      the one-device layer (transport_check.py);
#   4. the lowering audit of the dropless layer for this platform (lowering_audit.py).
# Every section has its own time limit, so one that hangs cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG="${OUT:-/tmp}/device_check.txt"
exec > >(tee "$LOG") 2>&1

if ! python3 -c "import ml_collections, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links .whl ml-collections tensorboardX \
    || echo "WARNING: could not install ml-collections / tensorboardX from .whl/"
fi
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
PLATFORM=$(python3 -c "import jax; print(jax.devices()[0].platform)")
KERNELS="dropless:ragged_dot"
[ "$PLATFORM" = "tpu" ] && KERNELS="$KERNELS,dropless:megablox"

echo; echo "## 1. MoE layer fwd+bwd: capacity vs dropless (bench_moe.py)"
timeout 170 python3 experiments/bench_moe.py --tokens 16384 --d_model 1024 --d_ff 4096 \
  --experts 8,32,128 --top_k 1,2 --dispatch "sort,$KERNELS" --dtype bfloat16 --repeats 10 \
  || echo "section 1 ended with status $?"

echo; echo "## 2. one train step of configs/gpu_1b.py (~1B active), capacity then dropless"
for arg in "" ":dropless"; do
  timeout 120 python3 experiments/bench_train.py --config="configs/gpu_1b.py$arg" --steps=10 \
    --warmup=2 || echo "section 2 ($arg) ended with status $?"
done

echo; echo "## 3. dropless expert-parallel transports vs one device (transport_check.py)"
timeout 60 python3 experiments/transport_check.py --mesh expert=-1 --tokens 16384 \
  --d_model 1024 --d_ff 4096 || echo "section 3 ended with status $?"

echo; echo "## 4. lowering audit of the layer for this platform (lowering_audit.py)"
timeout 40 python3 experiments/lowering_audit.py --platforms "$([ "$PLATFORM" = gpu ] && echo cuda || echo "$PLATFORM")" \
  || echo "section 4 ended with status $?"
date -u
