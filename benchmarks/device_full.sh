#!/usr/bin/env bash
# The whole Tiny ImageNet on the GPU machine: the reference runs of the three losses and of
# the original configuration, 15 epochs each, over several device calls.
#
# The archive (231 MiB) is larger than one call carries (64 MiB), so it goes in parts
# (benchmarks/device_full_prepare.sh cuts them into device/full/ and prints the calls). Every
# call runs this same script; the state lives in $STATE (/tmp/dlops-full), which the
# machine keeps between calls while it stays warm. Each call does what is left:
#
#   parts     move this call's parts (device/full/part-NN) into $STATE/parts, md5 per part
#   join      once all are there: join them, check the md5 of the whole (else: exit 0, waiting)
#   install   the wheels from device/wheels (they come with the last part), once
#   fetch     dlops data fetch tiny-imagenet --source the joined archive, once
#   runs      dlops final for each run not done yet, --resume, cut by the call's budget (SIGTERM:
#             the epoch checkpoints stay and the next call resumes the run)
#   summary   summary.json and summary.md (the README table), printed last
#
# Runs (spec, params):
#   ce        resnet18-ce          benchmarks/reference-params/resnet18-ce.json
#   triplet   resnet18-triplet     benchmarks/reference-params/resnet18-triplet.json
#   center    resnet18-center      benchmarks/reference-params/resnet18-center.json
#   original  resnet18-ce-original --params baseline (the original experiment, exactly)
#
# OUT gets run.log (every call so far), summary.json, summary.md and results.tar.gz (each
# finished run's final.json, curves.png and report.md, and every log).
#
#   bash benchmarks/device_full.sh OUT [--runs ce,triplet,center,original] [--epochs 15] [--budget-s 540]
#   bash benchmarks/device_full.sh OUT --smoke    # CPU rehearsal: 2 epochs, tiny sizes, installs nothing
# Environment: DLOPS_FULL_STATE (default /tmp/dlops-full), DLOPS_FULL_PARTS (default
# device/full), DLOPS_GIT_COMMIT (the commit the tree was copied from; the GPU machine's
# copy has no .git), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { echo "usage: $0 OUT [--smoke] [--runs LIST] [--epochs E] [--budget-s S]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
SMOKE=0; RUNS=ce,triplet,center,original; EPOCHS=; BUDGET=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --runs) RUNS=$2; shift ;;
    --epochs) EPOCHS=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    *) usage ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STATE=${DLOPS_FULL_STATE:-/tmp/dlops-full}
PARTS=${DLOPS_FULL_PARTS:-$ROOT/device/full}
mkdir -p "$STATE/parts" "$STATE/logs" "$STATE/done"
exec > >(tee -a "$STATE/logs/run.log") 2>&1
TEE=$!  # waited for before run.log is copied: it gets every line, the summary too

export PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export DLOPS_HOME=$STATE/home
unset DLOPS_STORAGE
SITE=/tmp/dlops-site
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  BUDGET=${BUDGET:-240}
  EPOCHS=${EPOCHS:-2}
  EXTRA="--subset-classes 4 --subset-per-class 4"
  # The same settings at a CPU's size: width 8, batches of 16 (P x K = 4 x 4 for triplet).
  PARAMS=$STATE/smoke-params
  mkdir -p "$PARAMS"
  "$PYTHON" - "$PARAMS" <<'PY'
import json, sys
from pathlib import Path
small = {"width": 8, "batch_size": 16, "eval_batch_size": 64}
for src in Path("benchmarks/reference-params").glob("*.json"):
    Path(sys.argv[1], src.name).write_text(json.dumps({**json.loads(src.read_text()), **small}))
Path(sys.argv[1], "resnet18-ce-original.json").write_text(json.dumps({"lr": 1e-3, **small}))
PY
else
  DEVICE=cuda
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}  # the checkout first: the code under test
  BUDGET=${BUDGET:-520}
  EPOCHS=${EPOCHS:-15}
  EXTRA=""
  PARAMS=benchmarks/reference-params
fi
START=$(date +%s)
RESERVE=20  # seconds kept for the summary and the packing
left() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }
ZIP=$STATE/tiny-imagenet-200.zip

finish() {  # $1: exit status
  timeout -k 5 60 "$PYTHON" benchmarks/device_helpers.py full-summary --home "$DLOPS_HOME" --runs "$RUNS" \
    --state "$STATE" --out "$OUT" > "$STATE/logs/summary.log" 2>&1 || true
  local files=(logs) d f
  for d in "$STATE"/home/reports/*/; do
    for f in final.json curves.png report.md; do
      [ -f "$d$f" ] && files+=("home/reports/$(basename "$d")/$f")
    done
  done
  tar -czf "$OUT/results.tar.gz" -C "$STATE" "${files[@]}"
  cat "$STATE/logs/summary.log"
  exec >&- 2>&-  # tee reads to the end of its input, writes it out and ends
  wait "$TEE"
  cp "$STATE/logs/run.log" "$OUT/run.log"
  exit "$1"
}

echo "dlops full-data runs: $( [ "$SMOKE" = 1 ] && echo "CPU rehearsal (--smoke)" || echo GPU ), call at $(date -u +%FT%TZ), budget ${BUDGET}s, runs $RUNS, $EPOCHS epochs, state $STATE"

# parts and join: the standard library only, before anything is installed.
if [ -f "$PARTS/MANIFEST.json" ]; then
  "$PYTHON" benchmarks/device_parts.py collect "$PARTS" "$STATE/parts" || echo "a rejected part must come again"
fi
if [ ! -f "$STATE/parts/MANIFEST.json" ]; then
  echo "no parts yet: carry device/full/part-NN with device/full/MANIFEST.json (benchmarks/device_full_prepare.sh)"
  finish 1
fi
"$PYTHON" benchmarks/device_parts.py join "$STATE/parts" "$ZIP"
case $? in
  0) ;;
  3) echo "== the next call carries the next parts"; finish 0 ;;
  *) finish 1 ;;
esac

if [ "$SMOKE" = 0 ] && [ ! -f "$SITE/.dlops-installed" ]; then
  echo "== install $(date -u +%T)"
  PYTHONPATH= timeout -k 10 120 "$PYTHON" benchmarks/device_helpers.py install --wheels device/wheels --target "$SITE" \
    && touch "$SITE/.dlops-installed" || { echo "install failed: carry device/wheels"; finish 1; }
  "$PYTHON" benchmarks/device_helpers.py versions --out "$STATE/logs/versions.json" > /dev/null || true
  command -v nvidia-smi >/dev/null && nvidia-smi > "$STATE/logs/nvidia-smi.txt" 2>&1
fi

if [ ! -f "${DLOPS_DATA:-$DLOPS_HOME/data}/tiny-imagenet/cache/manifest.json" ]; then
  echo "== fetch $(date -u +%T)"
  t0=$(date +%s)
  timeout -k 10 "$(left)" "$PYTHON" -m dlops.cli data fetch tiny-imagenet --source "$ZIP" 2>&1 | tee "$STATE/logs/fetch.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "fetch failed"; finish 1; }
  echo "fetch: $(( $(date +%s) - t0 ))s"
  rm -rf "${DLOPS_DATA:-$DLOPS_HOME/data}/tiny-imagenet/raw"  # the cache holds everything the runs read
fi

run_args() {  # run name -> "SPEC --params P"
  case $1 in
    ce|triplet|center) echo "resnet18-$1 --params $PARAMS/resnet18-$1.json" ;;
    original) [ "$SMOKE" = 1 ] && echo "resnet18-ce-original --params $PARAMS/resnet18-ce-original.json" \
                || echo "resnet18-ce-original --params baseline" ;;
    *) return 1 ;;
  esac
}

FAILED=0
for run in ${RUNS//,/ }; do
  args=$(run_args "$run") || { echo "unknown run $run (ce, triplet, center, original)"; FAILED=1; continue; }
  if [ -f "$STATE/done/$run" ]; then echo "== $run: done in an earlier call"; continue; fi
  limit=$(left)
  if [ "$limit" -lt 60 ]; then echo "== $run: not started (${limit}s left in this call): the next call runs it"; continue; fi
  echo "== $run: dlops final $args (limit ${limit}s) $(date -u +%T)"
  # shellcheck disable=SC2086
  timeout -s TERM -k 60 "$limit" "$PYTHON" -m dlops.cli final $args --epochs "$EPOCHS" --seeds 1 \
    --device "$DEVICE" --resume $EXTRA 2>&1 | tee -a "$STATE/logs/$run.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) touch "$STATE/done/$run"; echo "== $run: done" ;;
    124|130|143) echo "== $run: cut by this call's budget; its checkpoints stay and the next call resumes it" ;;
    *) echo "== $run: failed (rc $rc)"; FAILED=1 ;;
  esac
done
finish "$FAILED"
