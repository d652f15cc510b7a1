#!/usr/bin/env bash
# Builds, on a machine with pip and a package index, the wheel set the GPU machine lacks, for its Python 3.12 on
# manylinux x86-64: one version of each (this environment's, from bench/gpu/wheelset.py), deepspeed as a pure wheel
# without compiled ops, and the HH data the benchmarks read. It goes into bench/gpu/kit/ (git-ignored), which
# check.sh installs offline. Everything the device carries, the working tree included, must stay under 64 MiB: what
# does not fit (bitsandbytes, for QLoRA, is tried last) is left out and named in kit/MANIFEST.txt.
#
#   . .venv/bin/activate && bash bench/gpu/wheels.sh [KIT_DIR]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
KIT=${1:-$REPO/bench/gpu/kit}
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))  # the tree grows between building the kit and running the check
PY=${PYTHON:-python3}
PLATFORMS=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 28 27 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$KIT" && mkdir -p "$KIT/wheels"
"$PY" "$REPO/bench/gpu/wheelset.py" >"$KIT/requirements.txt"
while IFS= read -r pin; do
  case $pin in
    deepspeed==*)  # an sdist only: built here with no ops, which DeepSpeed then JIT-builds only if asked for
      DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" "$pin" ;;
    *)
      "$PY" -m pip download -q --no-deps "${PLATFORMS[@]}" -d "$KIT/wheels" "$pin" ;;
  esac
done <"$KIT/requirements.txt"

HH=${BIGRM_HH_DATA:-$REPO/../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}
cp "$HH" "$KIT/"  # the benchmarks' data: ../shared beside the repo does not travel to the device

tree_bytes() {  # what travels: tracked and untracked-not-ignored files, and the kit
  (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
}
kit_bytes() { du -sb "$KIT" | cut -f1; }
{
  echo "# built $(date -u +%FT%TZ) by bench/gpu/wheels.sh with $("$PY" -V 2>&1)"
  echo "# carried (bytes):"
  (cd "$KIT/wheels" && stat -c '%s %n' ./*.whl)
} >"$KIT/MANIFEST.txt"

# QLoRA's 4-bit kernels: bitsandbytes' wheel holds CUDA binaries for every architecture, so it may not fit
BNB=$("$PY" -c 'from importlib.metadata import version; print(version("bitsandbytes"))' 2>/dev/null || true)
if [ -n "$BNB" ]; then
  TMP=$(mktemp -d)
  if "$PY" -m pip download -q --no-deps "${PLATFORMS[@]}" --platform manylinux_2_24_x86_64 -d "$TMP" \
      "bitsandbytes==$BNB"; then
    size=$(stat -c %s "$TMP"/*.whl)
    room=$((LIMIT - MARGIN - $(tree_bytes) - $(kit_bytes)))
    if [ "$size" -le "$room" ]; then
      mv "$TMP"/*.whl "$KIT/wheels/" && echo "$size ./$(basename "$KIT"/wheels/bitsandbytes-*.whl)" >>"$KIT/MANIFEST.txt"
    else
      echo "# did not fit: bitsandbytes==$BNB ($size bytes; room $room): QLoRA is skipped on the device" \
        >>"$KIT/MANIFEST.txt"
    fi
  else
    echo "# not found: a bitsandbytes==$BNB wheel for Python 3.12 manylinux x86-64" >>"$KIT/MANIFEST.txt"
  fi
  rm -rf "$TMP"
else
  echo "# not carried: bitsandbytes is not installed here (pip install -e '.[qlora]')" >>"$KIT/MANIFEST.txt"
fi

total=$(($(tree_bytes) + $(kit_bytes)))
echo "# the working tree with the kit: $total bytes of $LIMIT" >>"$KIT/MANIFEST.txt"
cat "$KIT/MANIFEST.txt"
if [ "$total" -gt "$LIMIT" ]; then
  echo "over the device's 64 MiB: leave something out" >&2
  exit 1
fi
