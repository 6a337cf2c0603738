#!/usr/bin/env bash
# The project's GPU checks for a CUDA machine without network access: its image holds torch (CUDA), jax (CUDA),
# cupy, optax, numpy, scipy and pytest, but not array-api-compat / array-api-strict, which travel as wheels in
# .whl/ (ignored by git; copy it to the GPU machine with the working tree).
#
#   with network, once:      bash benchmarks/gpu_device.sh prepare     (downloads the wheels into .whl/)
#   on the GPU machine:      bash benchmarks/gpu_device.sh tests       (pytest -m "gpu or not slow": CuPy, torch CUDA,
#                                                                       JAX on GPU; about 5 minutes)
#                            bash benchmarks/gpu_device.sh matrix      (the equivalence matrix on the GPU backends)
#                            bash benchmarks/gpu_device.sh bench       (python -m benchmarks --device cuda)
#                            bash benchmarks/gpu_device.sh check       (GPU tests, CuPy tests, the equivalence matrix
#                                                                       on the GPU backends; about 6 minutes,
#                                                                       time-boxed)
#                            bash benchmarks/gpu_device.sh release     (GPU tests, CuPy tests, the matrix for one rule
#                                                                       of each kind, the elementwise benchmark;
#                                                                       about 8 minutes, time-boxed)
#                            bash benchmarks/gpu_device.sh quick       (check's tests, the verifier on the GPU
#                                                                       backends, the elementwise GPU benchmark;
#                                                                       about 9 minutes, time-boxed)
#
# Each stage writes its log and a tarball of its results to $OUT (default /tmp/xpoptim-gpu-out); unpack them into
# benchmarks/results/<gpu>/. Every stage takes under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
OUT="${OUT:-/tmp/xpoptim-gpu-out}"
mkdir -p "$OUT"

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "array-api-compat==1.16.0" "array-api-strict==2.6.1"
    ls .whl
}

install() {
    nvidia-smi -L
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    # xpoptim itself without pip (no build backend needed): the package lives in src/.
    export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    python3 - <<'EOF'
import cupy, jax, torch, xpoptim
print("xpoptim", xpoptim.__file__)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
print("jax", jax.__version__, jax.devices())
print("cupy", cupy.__version__, "cuda", cupy.cuda.is_available())
EOF
}

# The time-boxed parts of the check, release and quick stages (first argument: the time box in seconds); each writes
# its log (and results tarball) to $OUT and never stops the stage.
gpu_tests() {
    PYTHONUNBUFFERED=1 timeout "$1" python3 -m pytest -q -p no:cacheprovider -m gpu tests \
        2>&1 | tee "$OUT/gpu-tests.log" || true
}

cupy_tests() {
    PYTHONUNBUFFERED=1 timeout "$1" python3 -m pytest -q -p no:cacheprovider \
        tests/array_adapter/test_array_cupy.py tests/array_adapter/test_array_trajectories.py \
        2>&1 | tee "$OUT/cupy-tests.log" || true
}

gpu_matrix() {
    # The verifier stops starting cells 40 s before the box closes, so its report (the cells checked, and the
    # configurations not reached) is written even when the selection does not fit.
    local box="$1"
    shift
    PYTHONUNBUFFERED=1 timeout "$box" python3 -m xpoptim.matrix --backends numpy,gpu --no-demo --no-progress \
        --time-limit "$((box - 40))" --out /tmp/matrix-gpu "$@" 2>&1 | tee "$OUT/matrix.log" || true
    tar czf "$OUT/matrix-gpu.tgz" -C /tmp matrix-gpu || true
}

gpu_bench() {
    PYTHONUNBUFFERED=1 timeout "$1" python3 -m benchmarks --device cuda --only elementwise --out /tmp/bench-gpu \
        2>&1 | tee "$OUT/bench.log" || true
    tar czf "$OUT/bench-gpu.tgz" -C /tmp bench-gpu || true
}

case "$stage" in
    prepare)
        prepare
        ;;
    tests)
        install
        set -o pipefail
        PYTHONUNBUFFERED=1 python3 -m pytest -m "gpu or not slow" -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
        ;;
    matrix)
        install
        PYTHONUNBUFFERED=1 python3 -m xpoptim.matrix --out /tmp/matrix-gpu 2>&1 | tee "$OUT/matrix.log"
        tar czf "$OUT/matrix-gpu.tgz" -C /tmp matrix-gpu
        ;;
    bench)
        install
        shift
        PYTHONUNBUFFERED=1 python3 -m benchmarks --device cuda --out /tmp/bench-gpu "$@" 2>&1 | tee "$OUT/bench.log"
        tar czf "$OUT/bench-gpu.tgz" -C /tmp bench-gpu
        ;;
    check)
        # Correctness on the GPU in one call: GPU-marked tests, the CuPy adapter tests, and the equivalence matrix
        # on the GPU backends (CuPy, CUDA torch, JAX on GPU) against the float64 NumPy run; each part time-boxed.
        install
        gpu_tests 200
        cupy_tests 100
        gpu_matrix 150
        ;;
    release)
        # One call of about 8 minutes for a release: the GPU tests, the CuPy tests, the matrix on the GPU backends for
        # one rule of each kind (AdamW, MVN-Grad, M-SVAG, Muon, DeVA_Sinf; default configurations), and the
        # elementwise GPU benchmark; each part time-boxed.
        install
        gpu_tests 170
        cupy_tests 70
        gpu_matrix 110 --optimizers adamw,mvngrad,msvag,muon,deva_sinf --no-variants
        gpu_bench 120
        ;;
    quick)
        # Everything in one call of under 10 minutes: the GPU tests, the CuPy tests, the verifier on the GPU
        # backends (default configurations, DeVA_Sinf and one rule of each kind first), then the elementwise GPU
        # benchmark, each time-boxed so that the call ends with its logs even when a part runs long.
        install
        gpu_tests 180
        cupy_tests 80
        gpu_matrix 130 --no-variants --optimizers deva_sinf,adamw,mvngrad,msvag,muon,deva_linf,adam_star,sgd,mssd,svag,adam,adabelief,laprop,msvag_mb,adam_star_mb
        gpu_bench 160
        ;;
    *)
        echo "usage: bash benchmarks/gpu_device.sh prepare|tests|check|release|matrix|bench|quick [benchmark args]" >&2
        exit 2
        ;;
esac
