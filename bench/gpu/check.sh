#!/usr/bin/env bash
# The whole GPU check in one command, ending inside 9 minutes on one H100/H200 (docs/performance.md):
#
#   bash bench/gpu/check.sh [--dry-run] [--out DIR] [--kit DIR] [--budget SECONDS] [--skip PART,...]
#
# It installs the wheels of bench/gpu/kit (built by wheels.sh) offline, then runs each part under its own `timeout`
# (a part that hangs or fails costs its own box, not the rest), most wanted first: the GPU tests (`pytest -m gpu`),
# bench_gpu.py's 1B full fine-tune, bigrm vs TRL at K = 2 and K = 4, compiled blocks, the other attention backends,
# QLoRA when bitsandbytes is there; parts not possible yet are written down as skipped, with the reason. No part
# starts past the overall deadline, and each box is cut to what is left before it. Every figure goes to DIR (default $OUT, else outputs/gpu-check): results.json,
# results.md (GPU name, torch and CUDA versions, one table per kind of figure) and logs.tar.gz (each part's log).
# --dry-run: the same parts on the CPU at tiny sizes (tests/bench/test_gpu_check.py runs it).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 2
DRY=0
DEST=${OUT:-$REPO/outputs/gpu-check}
KIT=$REPO/bench/gpu/kit
BUDGET=
SKIP=,
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) DEST=$2; shift ;;
    --kit) KIT=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --skip) SKIP=,$2, ; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR] [--kit DIR] [--budget SECONDS] [--skip PART,...]" >&2; exit 2 ;;
  esac
  shift
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bigrm-gpu-check.XXXXXX")
# a fixed place: DeepSpeed's JIT-built ops (on CPU, its shared-memory op) are cached per source path
SITE=${TMPDIR:-/tmp}/bigrm-gpu-check-site
mkdir -p "$DEST" "$WORK/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} BIGRM_CACHE_DIR=$WORK/token-cache
[ -f "$KIT/hh-rlhf-harmless-base-test.jsonl.gz" ] && export BIGRM_HH_DATA=$KIT/hh-rlhf-harmless-base-test.jsonl.gz
START=$(date +%s)
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  TOTAL=${BUDGET:-900}
  SCALE=2  # CPU boxes: shared cores run the children several times slower, and DeepSpeed's CPU backend JIT-builds
  # its shared-memory op in the first run on a machine
  TRAIN=(--size tiny --device cpu --steps 3 --warmup 1 --log_every 1 --max_tokens_per_batch 2048)
  SPEED=(--device cpu --data K=2 --prompts 4 4 4 --repeats 1)
  HEADLINE=sdpa BACKENDS="eager" CUDA_ONLY="varlen flex"
else
  TOTAL=${BUDGET:-530}
  SCALE=1
  TRAIN=(--steps 8 --warmup 4 --log_every 2)
  SPEED=(--device cuda --size 1b --data K=2 K=4 --prompts 64 32 16 --budget 16384 --trl-batch 16 --repeats 1)
  HEADLINE=varlen BACKENDS="flex sdpa" CUDA_ONLY=
fi
DEADLINE=$((START + TOTAL - 10))  # the summary's few seconds stay inside the budget

record() { "$PY" bench/gpu/report.py record "$WORK" "$@"; }
skip() { record --part "$1" --status skipped --reason "$2"; }

# part NAME KIND BOX COMMAND...: COMMAND under `timeout` (BOX seconds, cut to what is left before the deadline),
# its output in logs/NAME.log, its figures (if KIND has any) in NAME.json or NAME.xml
part() {
  local name=$1 kind=$2 box=$3 left rc t0 ms
  shift 3
  box=$((box * SCALE))
  case $SKIP in *,$name,*) skip "$name" "left out (--skip)"; return ;; esac
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 15 ]; then
    skip "$name" "out of time: ${left} s left of the ${TOTAL} s check"
    return
  fi
  [ "$box" -gt "$left" ] && box=$left
  local cmd="$*"
  echo "== $name (at most $box s): ${cmd:0:400}"
  t0=$(date +%s%N)
  timeout -k 10 "$box" "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  tail -n 3 "$WORK/logs/$name.log"
  record --part "$name" --kind "$kind" --rc "$rc" --box "$box" --seconds "$((ms / 1000)).$(printf %03d $((ms % 1000)))" \
    --command "$cmd"
}

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

install() {
  local wheels=("$KIT"/wheels/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    skip install "no wheels in $KIT/wheels (bench/gpu/wheels.sh builds them): this environment's packages are used"
  elif "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    part install none 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}"
    export PYTHONPATH=$PYTHONPATH:$SITE PATH=$SITE/bin:$PATH  # bigrm from the tree first, then the kit
  else  # the kit is for the GPU machine's Python 3.12: checked for it, not installed into this one
    part install none 60 "$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target "$WORK/unused" "${wheels[@]}"
  fi
}

bench_run() {  # bench_run NAME BOX ATTN [bench_gpu.py arguments...]
  local name=$1 box=$2 attn=$3
  shift 3
  part "$name" bench_gpu "$box" "$PY" bench/bench_gpu.py "${TRAIN[@]}" --attn "$attn" "$@" \
    --json "$WORK/$name.json" --out "$WORK/runs/$name"
}

install
part env env 60 "$PY" bench/gpu/report.py env "$WORK/env.json"
PYTEST=(-m gpu tests/runs/test_gpu.py -q -p no:cacheprovider --junitxml "$WORK/gpu-tests.xml")
[ $DRY = 0 ] && has xdist && PYTEST+=(-n 8)  # torch.compile's CPU-side work in parallel; one GPU is plenty
has pytest_timeout && PYTEST+=(--timeout 240)
part gpu-tests pytest 150 "$PY" -m pytest "${PYTEST[@]}"
bench_run bench-1b 120 "$HEADLINE" --setups 1b-full
part speed bench_speed 120 "$PY" bench/bench_speed.py "${SPEED[@]}" --skip-loss-share --json "$WORK/speed.json"
bench_run compiled 120 "$HEADLINE" --setups 1b-full --compile
for attn in $BACKENDS; do bench_run "attn-$attn" 90 "$attn" --setups 1b-full; done
for attn in $CUDA_ONLY; do skip "attn-$attn" "dry run: $attn trains on CUDA only"; done
if has flash_attn; then bench_run attn-flash_attn 90 flash_attn --setups 1b-full
else skip attn-flash_attn "flash-attn is not installed here"; fi
if has bitsandbytes; then bench_run qlora 150 auto --setups 7b-qlora
else skip qlora "bitsandbytes is not installed (its wheel was not carried: see bench/gpu/kit/MANIFEST.txt)"; fi
skip sequence-parallel "bigrm has no sequence parallelism yet"
if [ -f bench/bench_serve.py ]; then skip serve "bench/bench_serve.py is not wired into the check yet"
else skip serve "no bigrm serve benchmark in this tree (bench/bench_serve.py)"; fi
if has vllm; then skip vllm "no vLLM pooling vs bigrm score comparison in this tree yet"
else skip vllm "vllm is not installed here"; fi

"$PY" bench/gpu/report.py summary "$WORK" "$DEST" --budget "$TOTAL" --dry-run "$DRY" --started "$START"
rc=$?
(cd "$WORK" && tar -czf "$DEST/logs.tar.gz" logs $(cd "$WORK" && find runs -name train.out 2>/dev/null))
rm -rf "$WORK"
exit $rc
