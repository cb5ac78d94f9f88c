#!/usr/bin/env bash
# What a GPU session should run (device time is scarce; one device command may run at
# most 10 minutes, so run the steps as separate commands):
#   bench/gpu_session.sh tests     the GPU test suite (8 workers with pytest-xdist), and
#                                  bench/check_fla_twins.py
#   bench/gpu_session.sh tune [SHAPES]  tune the benchmarked specs (default the standard
#                                  shape 16,2048,16,128,128), timing each
#   bench/gpu_session.sh bench [ARGS]  the benchmark (writes <device>.md and .png); ARGS go
#                                  to bench.py, e.g. --quick --variants gla
#   bench/gpu_session.sh profile [SPECS]  each kernel's time, bytes and GB/s at the standard
#                                  shape, forward and backward (writes <device>-kernels.md)
#   bench/gpu_session.sh host [SPECS]  where each forward's (and forward + backward's) host time
#                                  goes: attnc's Python, Triton's launch path, PyTorch's ops
#                                  (bench/host_profile.py; writes <device>-host.md, and
#                                  host-backward/<device>-host.md); default the four benchmarked specs
#   bench/gpu_session.sh compile   how much Triton's compiles gain from 16 threads and from 16
#                                  worker processes (tuning compiles its candidates in
#                                  processes); no GPU work
#   bench/gpu_session.sh forms [SPECS]  each kernel's time with the forward in one pass and
#                                  through chunk states (fused_forward=1 / 0, no tuning;
#                                  writes forms-1/ and forms-0/ under the results folder),
#                                  then the delta rule's state passes unpipelined
#                                  (state_stages=1, beside forms-1/: forms-stages-1/)
#   bench/gpu_session.sh fused-bwd [SPECS]  each kernel's time with the backward's fused
#                                  parts launched apart (fused_backward=0: the delta rule's
#                                  chunk_bwd_intra, which the default's chunk_bwd_wy replaces;
#                                  without per-channel gates the diagonal family's scores
#                                  kernels, which the default's dq / dk and dv kernels
#                                  replace; with one, gla's scores-gradient kernel over
#                                  every chunk, where the default's dq / dk kernel computes
#                                  dA for the chunks it takes whole), beside forms-1/;
#                                  default mamba2 gla deltanet gated_deltanet; writes
#                                  forms-bwd-0/
#   bench/gpu_session.sh long [SPECS]  each kernel's time at T = 32768, B = 1 with the state
#                                  passes and the one pass in groups of 64 chunks (the default
#                                  there) and over whole sequences (state_group=0: through
#                                  chunk states), no tuning; default the four benchmarked
#                                  specs; writes long-64/ and long-0/
#   bench/gpu_session.sh long-two-pass [SPECS]  the same at T = 32768 in groups but through
#                                  chunk states (fused_forward=0); writes long-64-two-pass/
#   bench/gpu_session.sh diag [SPECS]  each kernel's time with a per-channel gate's chunks
#                                  taken whole where their span allows (the default; the
#                                  benchmark's gates do), by sub-chunks with the diagonal
#                                  sub-blocks factored into the matmul beside them
#                                  (whole_chunk=0), and exact: 8 columns at a time and one at
#                                  a time (exact_diag=1 with diag_loop=0 / 1), no tuning;
#                                  default gla; writes diag-whole/, diag-factored/, diag-0/
#                                  and diag-1/
# Results and logs go to ${OUT:-bench/results}. The device image has torch and Triton
# but not lark/platformdirs/filelock/fla-core/einops (fla's one dependency): fetch their
# wheels into .whl first (see .library/device/README.md), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl lark==1.3.1 platformdirs filelock fla-core==0.6.0 einops
set -uo pipefail
step=${1:-tests}
shift || true
case "$step" in tests|tune|bench|profile|host|compile|forms|fused-bwd|long|long-two-pass|diag) ;; *) echo "usage: bench/gpu_session.sh tests|tune|bench|profile|host|compile|forms|fused-bwd|long|long-two-pass|diag" >&2; exit 2 ;; esac
out=${OUT:-bench/results}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/device.txt"
case "$step" in
tests)
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 420 python3 -m pytest tests/test_gpu.py -q $workers --durations=10 -p no:cacheprovider \
    2>&1 | tee "$out/gpu_tests.log"
# the fla ops bench.py times beside attnc compute the same recurrences (chunk and decode)
timeout 110 python3 bench/check_fla_twins.py 2>&1 | tee "$out/fla_twins.log" ;;
tune)
# ARGS: shapes B,T,H,K,V to tune (default the standard one); each spec's time is logged
[ $# -gt 0 ] || set -- 16,2048,16,128,128
for shape in "$@"; do
    for spec in mamba2 gla gated_deltanet deltanet; do
        start=$(date +%s.%N)
        timeout 150 attnc cache tune "$spec" --shape "$shape" --dtype bf16 2>&1 | tee -a "$out/tune.log"
        echo "$spec $shape: tuned in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s" | tee -a "$out/tune.log"
    done
done ;;
bench)
timeout 560 python3 bench/bench.py --out "$out" "$@" 2>&1 | tee -a "$out/bench.log" ;;
host)
[ $# -gt 0 ] || set -- mamba2 gla deltanet gated_deltanet
# (untuned: a tuned call would tune first, and the host work is the same but for the
# config lookup)
ATTNC_AUTOTUNE=off timeout 250 python3 bench/host_profile.py "$@" --out "$out" 2>&1 | tee -a "$out/host.log"
mkdir -p "$out/host-backward"
ATTNC_AUTOTUNE=off timeout 250 python3 bench/host_profile.py "$@" --backward --calls 20 --out "$out/host-backward" 2>&1 \
    | tee -a "$out/host.log" ;;
compile)
timeout 500 python3 bench/compile_threads.py gla --threads 16 2>&1 | tee -a "$out/compile.log" ;;
profile)
[ $# -gt 0 ] || set -- mamba2 gla deltanet gated_deltanet
timeout 560 python3 bench/kernel_times.py "$@" --out "$out" 2>&1 | tee -a "$out/profile.log" ;;
forms)
[ $# -gt 0 ] || set -- mamba2 gla deltanet gated_deltanet
for fused in 1 0; do
    ATTNC_AUTOTUNE=off timeout 230 python3 bench/kernel_times.py "$@" --calls 10 --config fused_forward=$fused \
        --out "$out/forms-$fused" 2>&1 | tee -a "$out/forms.log"
done
delta=$(printf '%s\n' "$@" | grep delta | tr '\n' ' ')
[ -z "$delta" ] || ATTNC_AUTOTUNE=off timeout 120 python3 bench/kernel_times.py $delta --calls 10 \
    --config fused_forward=1,state_stages=1 --out "$out/forms-stages-1" 2>&1 | tee -a "$out/forms.log" ;;
fused-bwd)
[ $# -gt 0 ] || set -- mamba2 gla deltanet gated_deltanet
ATTNC_AUTOTUNE=off timeout 260 python3 bench/kernel_times.py "$@" --calls 10 --config fused_forward=1,fused_backward=0 \
    --out "$out/forms-bwd-0" 2>&1 | tee -a "$out/forms.log" ;;
long)
[ $# -gt 0 ] || set -- mamba2 gla deltanet gated_deltanet
for group in 64 0; do
    ATTNC_AUTOTUNE=off timeout 280 python3 bench/kernel_times.py "$@" --shape 1,32768,16,128 --calls 10 \
        --config state_group=$group --out "$out/long-$group" 2>&1 | tee -a "$out/long.log"
done ;;
long-two-pass)
[ $# -gt 0 ] || set -- mamba2 gla deltanet gated_deltanet
ATTNC_AUTOTUNE=off timeout 500 python3 bench/kernel_times.py "$@" --shape 1,32768,16,128 --calls 10 \
    --config state_group=64,fused_forward=0 --out "$out/long-64-two-pass" 2>&1 | tee -a "$out/long.log" ;;
diag)
[ $# -gt 0 ] || set -- gla
ATTNC_AUTOTUNE=off timeout 140 python3 bench/kernel_times.py "$@" --calls 10 --out "$out/diag-whole" 2>&1 \
    | tee -a "$out/diag.log"
ATTNC_AUTOTUNE=off timeout 140 python3 bench/kernel_times.py "$@" --calls 10 --config whole_chunk=0 \
    --out "$out/diag-factored" 2>&1 | tee -a "$out/diag.log"
for loop in 0 1; do
    ATTNC_AUTOTUNE=off timeout 140 python3 bench/kernel_times.py "$@" --calls 10 \
        --config exact_diag=1,diag_loop=$loop --out "$out/diag-$loop" 2>&1 | tee -a "$out/diag.log"
done ;;
esac
