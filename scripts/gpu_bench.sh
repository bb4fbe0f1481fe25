#!/usr/bin/env bash
# Every speed and memory figure of the GPU issue, in three tiers, most important first.
#
#   bash scripts/gpu_bench.sh --fetch-wheels     # HERE, once (needs PyPI): the wheels to carry, in .whl/
#   bash scripts/gpu_bench.sh [OUTDIR]           # ON THE GPU MACHINE: tier 1, then 2, then 3, as time allows
#   bash scripts/gpu_bench.sh --tiny [OUTDIR]    # dry run of the very same steps at toy size on a CPU
#   TIERS=2,3 bash scripts/gpu_bench.sh          # only some tiers; STEPS=main,compile for some steps
#   BUDGET_S=540 by default: a step whose estimate does not fit what is left is skipped and says so,
#   so one 10-minute call measures tier 1 (about 8 minutes) and the next calls go on with TIERS=2,3.
#
# What travels. The GPU machine has no network. Its image has python3 (3.12) with CUDA torch,
# transformers, accelerate, safetensors and huggingface_hub, but not diffusers. So:
#   1. here, in the repo root:  bash scripts/gpu_bench.sh --fetch-wheels
#      It downloads diffusers 0.42.1 and torchao 0.17.0 (pure-Python and abi3 wheels for CPython 3.12,
#      about 10 MB) into .whl/ and adds /.whl/ to .git/info/exclude. diffusers' other requirements are
#      in the image (its importlib_metadata requirement is unused on Python >= 3.8).
#   2. the device tool:  command "bash scripts/gpu_bench.sh", carry [".whl"], timeout_s 600.
#      The script installs .whl/*.whl into /tmp/site (no network) and runs the repo from its root;
#      nothing else needs carrying (the models are built with random weights on the GPU).
# Output, in OUTDIR (default $OUT, else ./gpu-bench-out): speed.md (the table, cards and versions),
# speed.json (every record), log.txt. Written after every step, so a run cut short keeps what it did.
#
# Steps, most important first; each is one `python -m fireflow.bench.speed` (or `.families`) process
# (so a memory cap or an offload hook never leaks into the next) with its own time limit, and a step
# is skipped when the remaining budget cannot cover its estimate (rerun those with STEPS=...).
# Tier 1, FLUX.1-dev size:
#   main        eager bf16, 512 and 1024: edit, bare forward, overhead ratio, the reference
#               implementation's loop on the same inputs (edit / reference), batched x4 (invert once,
#               edit many), VAE encode/decode, text encoders (CLIP + T5 at 512 tokens)
#   compile     regional torch.compile of the repeated blocks, 1024: edit and forward
#   fp8-14      fp8 weight storage (diffusers layerwise casting), 1024 edit, capped at 14 GiB (16 GB cards)
#   e2e-fp8-14  image to image through FireFlowEditor.edit on a whole pipeline (T5, CLIP, VAE,
#               transformer), fp8 transformer + diffusers model CPU offload, capped at 14 GiB
#   group-14    bf16 with diffusers group offloading (block level, CUDA-stream prefetch), capped at 14 GiB
#   backends    diffusers attention backends _native_cudnn, _native_flash, _native_efficient, 1024
#   ao-14       torchao int8 weight-only, capped at 14 GiB (skipped if torchao did not travel)
#   fp8-22      fp8 weights capped at 22 GiB (24 GB cards; same numbers as fp8-14 if that fits)
#   e2e-bf16    the whole pipeline in bf16, nothing offloaded: the reference for e2e-fp8-14
#   compile512  regional compile at 512, with the batched edit
#   bf16-22     plain bf16 capped at 22 GiB: expected out of memory (its weights alone are 22.2 GiB)
# Tier 2, one process per released model (fireflow.bench.families; 1024 x 1024, Wan 480 x 832 x 81):
#   fam-<name>  random-weight edit in bf16 with its calls counted and peak memory, then the first of
#               native / fp8 / fp8 + group offload / that + features in RAM that runs under 22 GiB
#               and under 14 GiB; smallest model first: sd3.5-medium, flux2-klein-4b, z-image-turbo,
#               sd3.5-large, chroma1-hd, flux2-klein-9b, wan2.1-1.3b, qwen-image, then flux2-dev and
#               wan2.1-14b
# Tier 3:
#   fp8dq       torchao fp8 matmuls (float8 weights and per-row dynamic activations; Hopper), 1024:
#               edit and forward, and the velocity's relative error against the bf16 weights
#   precision   the same 8-step edit in fp32 and in bf16 on the same random weights, 512: relative
#               error of the final latents (fp32 without TF32)
set -uo pipefail
cd "$(dirname "$0")/.."

# Everything below runs inside main(), which bash parses whole before running: editing this file
# while it runs cannot derail the run.
main() {

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 torchao==0.17.0
    ls -la .whl
    exit 0
fi

TINY=0
if [[ "${1:-}" == "--tiny" ]]; then
    TINY=1
    shift
fi
OUTDIR="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$OUTDIR"
RUNS="$(mktemp -d /tmp/speed-runs.XXXX)"
LOG="$OUTDIR/log.txt"
BUDGET_S="${BUDGET_S:-540}"
TIER1=main,compile,fp8-14,e2e-fp8-14,group-14,backends,ao-14,fp8-22,e2e-bf16,compile512,bf16-22
FAMILIES=(sd3.5-medium flux2-klein-4b z-image-turbo sd3.5-large chroma1-hd flux2-klein-9b wan2.1-1.3b qwen-image
    flux2-dev wan2.1-14b)
TIER2="$(printf 'fam-%s,' "${FAMILIES[@]}")"
TIER3=fp8dq,precision
TIERS="${TIERS:-1,2,3}"
if [[ -z "${STEPS:-}" ]]; then
    STEPS=""
    for tier in ${TIERS//,/ }; do
        case "$tier" in
            1) STEPS+="$TIER1," ;;
            2) STEPS+="$TIER2" ;;
            3) STEPS+="$TIER3," ;;
            *) echo "TIERS takes 1, 2 and 3, comma-separated; got '$tier'" >&2; exit 2 ;;
        esac
    done
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    # The carried wheels, without their dependencies: the image already has those.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if ((TINY)); then
    # Same steps, toy model, CPU; the eager dynamo backend keeps the dry run free of a C++ build.
    SMALL=64 LARGE=128 DEV=(--tiny --device cpu --threads 1) COMPILE=(--compile --compile-backend eager)
    BUDGET_S="${BUDGET_S_TINY:-1800}"
else
    SMALL=512 LARGE=1024 DEV=() COMPILE=(--compile)
fi

{
    echo "# gpu_bench $(date -u +%FT%TZ) tiny=$TINY steps=$STEPS budget=${BUDGET_S}s"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c 'import torch, diffusers, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee -a "$LOG"

START=$SECONDS
# step NAME ESTIMATE_S LIMIT_S ARGS...: run one speed-benchmark process, then refresh the summary.
step() {
    run_step fireflow.bench.speed "$@"
}

# fstep MODEL ESTIMATE_S LIMIT_S ARGS...: step fam-MODEL, the families benchmark on one released model (tier 2).
fstep() {
    local model=$1
    shift
    run_step fireflow.bench.families "fam-$model" "$@" --models "$model"
}

run_step() {
    local module=$1 name=$2 estimate=$3 limit=$4
    shift 4
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    local used=$((SECONDS - START))
    if ((!TINY && used + estimate > BUDGET_S)); then
        echo "## $name: skipped, ${used}s used of ${BUDGET_S}s and it needs about ${estimate}s" | tee -a "$LOG"
        return 0
    fi
    echo "## $name (t=${used}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$PY" -m "$module" "${DEV[@]}" "$@" --out "$RUNS" --tag "$name" 2>&1 \
        | grep -v -e "should be kept in float32" -e "experimental feature" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    ((rc == 0)) || echo "## $name: exit status $rc (124: over its ${limit}s limit)" | tee -a "$LOG"
    "$PY" -m fireflow.bench.speed --summarize "$RUNS" --out "$OUTDIR" >/dev/null 2>>"$LOG"
}

FIT=(--sizes "$LARGE" --parts edit forward --warmup 1)
E2E=(--sizes "$LARGE" --parts e2e --warmup 1 --repeats 2)
step main 130 240 --sizes "$SMALL" "$LARGE" --targets 4 --warmup 1 --repeats 2
step compile 200 300 "${COMPILE[@]}" --sizes "$LARGE" --parts edit forward --warmup 2 --repeats 3
step fp8-14 45 120 --weights fp8 --memory-limit-gib 14 "${FIT[@]}" --repeats 2
step e2e-fp8-14 60 150 --weights fp8 --offload model --memory-limit-gib 14 "${E2E[@]}"
step group-14 90 200 --offload group --memory-limit-gib 14 "${FIT[@]}" --repeats 1 --forwards 1
step backends 60 150 --attention-backend _native_cudnn _native_flash _native_efficient --sizes "$LARGE" \
    --parts edit forward --warmup 1 --repeats 2
if "$PY" -c "import torchao" 2>/dev/null; then
    step ao-14 75 150 --quantize torchao-int8wo --memory-limit-gib 14 "${FIT[@]}" --repeats 2
elif [[ ",$STEPS," == *",ao-14,"* ]]; then
    echo "## ao-14: skipped, torchao is not installed (carry it: --fetch-wheels)" | tee -a "$LOG"
fi
step fp8-22 45 120 --weights fp8 --memory-limit-gib 22 "${FIT[@]}" --repeats 2
step e2e-bf16 50 150 "${E2E[@]}"
step compile512 120 240 "${COMPILE[@]}" --sizes "$SMALL" --parts edit forward batched --targets 4 --warmup 2 --repeats 3
step bf16-22 30 90 --memory-limit-gib 22 "${FIT[@]}" --repeats 1

# Tier 2. Estimates for an H100 (bf16 build, one timed edit after a warm-up, then the two caps).
FAM=(--fit 22 14 --warmup 1 --repeats 1)
fstep sd3.5-medium 50 150 "${FAM[@]}"
fstep flux2-klein-4b 60 150 "${FAM[@]}"
fstep z-image-turbo 70 180 "${FAM[@]}"
fstep sd3.5-large 90 200 "${FAM[@]}"
fstep chroma1-hd 100 240 "${FAM[@]}"
fstep flux2-klein-9b 100 240 "${FAM[@]}"
fstep wan2.1-1.3b 150 300 "${FAM[@]}"
fstep qwen-image 180 360 "${FAM[@]}"
fstep flux2-dev 240 480 --fit 22 14 --warmup 0 --repeats 1
# About 2 minutes an edit at 81 frames: a call of its own (STEPS=fam-wan2.1-14b); records are kept as made.
fstep wan2.1-14b 540 590 --fit 22 --warmup 0 --repeats 1

# Tier 3.
if "$PY" -c "import torchao" 2>/dev/null; then
    step fp8dq 60 150 --quantize torchao-fp8dq "${FIT[@]}" --repeats 2
elif [[ ",$STEPS," == *",fp8dq,"* ]]; then
    echo "## fp8dq: skipped, torchao is not installed (carry it: --fetch-wheels)" | tee -a "$LOG"
fi
step precision 120 300 --parts precision --dtype bf16 --sizes "$SMALL" --warmup 0 --repeats 1

echo "# done in $((SECONDS - START))s; table: $OUTDIR/speed.md" | tee -a "$LOG"
cat "$OUTDIR/speed.md" 2>/dev/null
}

main "$@"
