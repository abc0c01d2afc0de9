#!/usr/bin/env bash
# Issue 18 on one GPU, in one go (~11 minutes on an H100/H200): every measurement the issue asks for, each output
# written under benchmarks/results/<gpu>/ (e.g. h200/) as the printed tables followed by the closing JSON line.
#
#   bash benchmarks/gpu_run.sh              # run everything (each step time-boxed; a step that fails or times out
#                                           # is listed at the end and the rest still run)
#   bash benchmarks/gpu_run.sh --dry-run    # print the steps and their output files only (no GPU needed)
#
# Steps (shape of the paper: V 50,257, L 1,024, batch 16, bf16 autocast, float64 draws):
#   sampling_small       8 vs 1,024 steps, cumulative scalar (uniform source): speed-up / NFE ratio, outside-forward
#                        share, forward MFU, peak memory (the eager Euler row is in results/h100/)
#   sampling_1p3b        the same at 1.3b: MFU, peak memory at batch 16, L 1,024
#   training_small_compile  teacher and RK-4 student tokens/s, MFU, peak memory with torch.compile (eager: h100/)
#   sampling_small_compile  8 vs 64 steps with torch.compile (the compiled forward's MFU)
#   ar_small             the KV-cached AR model beside 8-step FS-DFM in one run (the README's side-by-side figure)
#   sampling_small_mask  8 vs 1,024 steps, mask source, cumulative scalar (= mdlm)
#   scaling_1p3b         per-step cost vs L and vs batch at 1.3b (samples/s; the batch that saturates the GPU)
#   gpu_tests            pytest -m gpu: the distribution/equality tests of every GPU path
# ONLY=name,name runs a subset. Expected total ~11 minutes (compilation included); each step is time-boxed.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python}
if [ $DRY = 1 ]; then
    GPU=${GPU_NAME:-gpu}
else
    GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(0); print(n.split()[-1].lower().split('-')[0])") || exit 1
fi
OUT=benchmarks/results/$GPU
[ $DRY = 1 ] || mkdir -p "$OUT"
S="--device cuda --vocab 50257 --autocast --sections sweep --sweep-len 1024 --sweep-batch 16"
T="--device cuda --preset small --vocab 50257 --len 1024 --batch 16"
STEPS=(  # name|time limit s|command, most needed first
  "sampling_small|150|$PY benchmarks/bench_sampling.py $S --preset small --rules cumulative_scalar --budgets 8,1024"
  "sampling_1p3b|300|$PY benchmarks/bench_sampling.py $S --preset 1.3b --rules cumulative_scalar --budgets 8,1024"
  "training_small_compile|300|$PY benchmarks/bench_training.py $T --steps 10 --repeats 2 --objectives teacher_dfm,student_rk4 --compile"
  "sampling_small_compile|240|$PY benchmarks/bench_sampling.py $S --preset small --compile --rules cumulative_scalar --budgets 8,64"
  "ar_small|200|$PY benchmarks/bench_ar.py $T --repeats 1 --student-steps 8"
  "sampling_small_mask|120|$PY benchmarks/bench_sampling.py $S --preset small --sweep-source mask --rules cumulative_scalar --budgets 8,1024"
  "scaling_1p3b|150|$PY benchmarks/bench_sampling.py --device cuda --vocab 50257 --autocast --preset 1.3b --sections scaling --scaling-source uniform"
  "gpu_tests|300|$PY -m pytest -q -m gpu tests"
)
failed=()
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
    file=$OUT/$name.txt
    if [ $DRY = 1 ]; then
        echo "$name (<= ${limit} s): $cmd > $file"
        continue
    fi
    echo "=== $name: $cmd" >&2
    { echo "=== $cmd  $(date -u)  load $(cut -d' ' -f1-3 /proc/loadavg)  commit $(git rev-parse --short HEAD 2>/dev/null)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
      timeout "$limit" $cmd 2>&1
      rc=$?
      echo "=== exit $rc  $(date -u)"
      exit $rc; } > "$file.part"
    rc=$?
    mv "$file.part" "$file"
    [ $rc = 0 ] || failed+=("$name (exit $rc)")
done
[ $DRY = 1 ] && exit 0
echo "outputs in $OUT; failed or timed out: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
