#!/usr/bin/env bash
# The cost benchmarks on one GPU, in one shot, on a fresh machine that reaches only the package registries: sets up
# the venv (a CUDA torch, then `.[all,dev]`), then runs every measurement, each time-boxed so that the whole run
# ends within TOTAL_S (default 570 s, under a 10-minute job limit). Each step's output goes to
# benchmarks/results/<gpu>/<step>.txt as it comes (unbuffered: a step killed by its time box keeps what it printed),
# headed by the command, date, load, commit and GPU, and closed by "=== exit <rc>"; summary.txt gets one line per
# step as it ends. <gpu> is the model from nvidia-smi's name, with the form factor where it changes the peak
# (h100, h100-pcie, h200, a100, ...; benchmarks/benchlib.py:gpu_folder).
#
#   bash benchmarks/gpu_run.sh              # set up, then run the default steps (a step that fails or runs out of
#                                           # time is listed at the end and the rest still run; exit 1 if any did)
#   bash benchmarks/gpu_run.sh --dry-run    # every step on the CPU at tiny shapes (~1 min; no GPU, no install):
#                                           # what CI runs (tests/test_benchmarks.py) so that this script cannot rot
#   ONLY=a,b bash benchmarks/gpu_run.sh     # a subset (the *_compile steps run only when named here)
#
# Environment: PYTHON (an interpreter to use as it is: no venv, no install), VENV (default .venv), OUT_DIR (default
# benchmarks/results/<gpu>; --dry-run: benchmarks/results/dry-run), TOTAL_S (the whole run's budget, seconds),
# GPU_NAME (overrides nvidia-smi's name).
#
# Steps, most needed first (shape of the paper: V 50,257, L 1,024, batch 16, bf16 autocast, float64 draws):
#   sampling_small       8 vs 1,024 steps, cumulative scalar (uniform source): speed-up / NFE ratio, outside-forward
#                        share, forward MFU, peak memory
#   gpu_tests            pytest -m gpu: the distribution/equality tests of every GPU path
#   sampling_1p3b        8 vs 64 steps at 1.3b (1,024 steps would take ~160 s): MFU, peak memory
#   training_small       teacher and RK-4 student tokens/s, MFU, peak memory (eager)
#   ar_small             the KV-cached AR model beside 8-step FS-DFM and the 1,024-step teacher, bf16 autocast (the
#                        uncached AR row, ~60 s a call, is left out)
#   sampling_small_mask  8 vs 1,024 steps, mask source, cumulative scalar (= mdlm)
#   scaling_1p3b         per-step cost vs L and vs batch at 1.3b (samples/s; the batch that saturates the GPU)
#   training_small_compile, sampling_small_compile   the same with torch.compile (ONLY=...: compilation is minutes)
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- the interpreter: PYTHON as given, else the venv's, set up here when it lacks a CUDA torch or the project
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ $DRY = 1 ]; then
    PY=python3
    [ -x "${VENV:-.venv}/bin/python" ] && PY=${VENV:-.venv}/bin/python
else
    VENV=${VENV:-.venv}
    # --system-site-packages: a machine image's CUDA torch is used as it is, not downloaded again
    [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV" ||
        { echo "cannot create the venv $VENV (install python3-venv, or set PYTHON=an interpreter with CUDA torch)" >&2; exit 1; }
    PY=$VENV/bin/python
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        # PyPI's Linux torch wheel is the CUDA build; a CPU wheel (torch==X+cpu, from the CPU index) is replaced.
        echo "installing a CUDA torch into $VENV" >&2
        "$PY" -m pip uninstall -y -q torch 2>/dev/null
        timeout 300 "$PY" -m pip install -q "torch>=2.13" || { echo "pip install torch failed" >&2; exit 1; }
        "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
            { echo "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device" >&2; exit 1; }
    fi
    if ! "$PY" -c "import fsdfm, pytest, scipy, transformers" 2>/dev/null; then
        # offline, the project still runs from PYTHONPATH if its core dependencies are there: a warning, not a stop
        timeout 240 "$PY" -m pip install -q -e ".[all,dev]" || echo "pip install -e .[all,dev] failed" >&2
        "$PY" -c "import fsdfm, pytest, transformers" || { echo "fsdfm or pytest cannot be imported" >&2; exit 1; }
    fi
fi

# --- the device folder and the shapes
if [ $DRY = 1 ]; then
    GPU=dry-run
    DEV="--device cpu --threads 1"
    SMALL=tiny BIG=tiny LONG=16 MID=16 STEPS=1 VOCAB=64 AR="--len 16 --student-steps 2 --repeats 1"
    S="$DEV --quick --vocab $VOCAB --autocast --sections sweep --sweep-len 16 --sweep-batch 2"
    T="$DEV --quick --preset tiny --vocab 64 --len 16 --batch 2"
    SCALING="--quick"
    GPU_TESTS="tests/test_gpu.py"  # collected and skipped without CUDA: checks the file still imports
else
    NAME=${GPU_NAME:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)}
    GPU=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from benchlib import gpu_folder; print(gpu_folder(sys.argv[1]))" "$NAME") ||
        { echo "no GPU name (nvidia-smi: '$NAME'); set GPU_NAME" >&2; exit 1; }
    DEV="--device cuda"
    # the sampler's block sums through torch.compile (fsdfm.sparse_step; off by default in studies): measured here
    export FSDFM_SAMPLER_COMPILE=${FSDFM_SAMPLER_COMPILE:-1}
    SMALL=small BIG=1.3b LONG=1024 MID=64 STEPS=10 VOCAB=50257 AR="--repeats 1 --student-steps 8"
    S="$DEV --vocab $VOCAB --autocast --sections sweep --sweep-len 1024 --sweep-batch 16"
    T="$DEV --preset small --vocab 50257 --len 1024 --batch 16"
    SCALING=""
    GPU_TESTS="tests"
fi
OUT=${OUT_DIR:-benchmarks/results/$GPU}
mkdir -p "$OUT" || exit 1
TOTAL_S=${TOTAL_S:-570}
SAMP="$PY benchmarks/bench_sampling.py"
STEP_LIST=(  # name|time limit s|command; the limits of the default steps sum to 540 s
  "sampling_small|90|$SAMP $S --preset $SMALL --rules cumulative_scalar --budgets 8,$LONG"
  "gpu_tests|60|$PY -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS"
  "sampling_1p3b|90|$SAMP $S --preset $BIG --rules cumulative_scalar --budgets 8,$MID"
  "training_small|80|$PY benchmarks/bench_training.py $T --steps $STEPS --repeats 2 --objectives teacher_dfm,student_rk4"
  "ar_small|90|$PY benchmarks/bench_ar.py $T $AR --autocast --ar-cache on"
  "sampling_small_mask|70|$SAMP $S --preset $SMALL --sweep-source mask --rules cumulative_scalar --budgets 8,$LONG"
  "scaling_1p3b|60|$SAMP $DEV $SCALING --vocab $VOCAB --autocast --preset $BIG --sections scaling --scaling-source uniform"
  "training_small_compile|240|$PY benchmarks/bench_training.py $T --steps $STEPS --repeats 2 --objectives teacher_dfm,student_rk4 --compile"
  "sampling_small_compile|200|$SAMP $S --preset $SMALL --compile --rules cumulative_scalar --budgets 8,$MID"
)
failed=()
: > "$OUT/summary.txt"
for step in "${STEP_LIST[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    if [ -n "${ONLY:-}" ]; then
        [[ ",$ONLY," == *",$name,"* ]] || continue
    elif [[ $name == *_compile ]]; then
        continue
    fi
    file=$OUT/$name.txt
    left=$((TOTAL_S - ($(date +%s) - START) - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "$name: skipped (the run's ${TOTAL_S} s are spent)" | tee -a "$OUT/summary.txt" >&2
        failed+=("$name (skipped: no time left)")
        continue
    fi
    echo "=== $name (<= ${limit} s): $cmd" >&2
    {
        echo "=== $cmd  $(date -u)  load $(cut -d' ' -f1-3 /proc/loadavg)  commit $(git rev-parse --short HEAD 2>/dev/null)  FSDFM_SAMPLER_COMPILE=${FSDFM_SAMPLER_COMPILE:-0}"
        [ $DRY = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    } > "$file"
    t0=$(date +%s)
    # shellcheck disable=SC2086  # $cmd is a word list on purpose
    timeout -k 10 "$limit" $cmd >> "$file" 2>&1
    rc=$?
    echo "=== exit $rc  $(date -u)" >> "$file"
    [ $rc = 124 ] && why="timed out after ${limit} s" || why="exit $rc"
    echo "$name: $why in $(($(date +%s) - t0)) s -> $file" | tee -a "$OUT/summary.txt" >&2
    [ $rc = 0 ] || failed+=("$name ($why)")
done
echo "outputs in $OUT; failed or timed out: ${failed[*]:-none}" | tee -a "$OUT/summary.txt"
[ ${#failed[@]} = 0 ]
