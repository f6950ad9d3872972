#!/usr/bin/env bash
# Everything the GPU issue needs, in one call on a bare GPU machine, within about 8 minutes:
#
#   install     the wheels brought in device/wheels for whatever this Python lacks, into
#               /tmp/dlops-site (dlops itself runs from the checkout, first on PYTHONPATH)
#   versions    Python, PyTorch, CUDA, cuDNN, the GPU (nvidia-smi), package versions
#   cuda_tests  pytest -m cuda (tests/test_cuda.py) with the sample from device/
#   throughput  benchmarks/throughput.py: train/eval images/s per loss x batch x {eager, compiled}
#   fetch       the Tiny ImageNet sample from device/tiny-imagenet-200-sample.zip into $DLOPS_HOME
#   study_ce, study_triplet, study_center
#               a short real study per loss on the sample (pruner live), one SQLite database
#   curves      one unpruned run per loss with its study's best parameters; curves kept
#   summary     summary.json and a short table, printed last
#
# Each stage runs under `timeout` (and within the run's time budget); a stage that fails
# or hangs is recorded and the next one runs. OUT receives at most 8 files (the device
# tool brings back 8): run.log, summary.json, throughput.json, studies.db, curves.json,
# curves.png, logs.tar.gz (every stage's log, versions, the specs used).
#
#   bash benchmarks/device_run.sh OUT [--stages a,b,...] [--budget-s S]      # on the GPU machine
#   bash benchmarks/device_run.sh OUT --smoke     # CPU rehearsal: every stage, tiny sizes, installs nothing
#
# benchmarks/device_prepare.sh fills device/ here beforehand and prints the call to make.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { echo "usage: $0 OUT [--smoke] [--stages LIST] [--budget-s S]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
SMOKE=0; STAGES=all; BUDGET=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --stages) STAGES=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    *) usage ;;
  esac
  shift
done
STAGES=${STAGES//studies/study_ce,study_triplet,study_center}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/dlops-device.XXXXXX)
mkdir -p "$WORK/logs" "$WORK/specs"
exec > >(tee "$OUT/run.log") 2>&1
TEE=$!  # waited for at the end: run.log and the console get the summary whole

export PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export DLOPS_HOME=$WORK/home
unset DLOPS_STORAGE
export SITE=/tmp/dlops-site
SAMPLE=${DLOPS_TINY_IMAGENET_SAMPLE:-$ROOT/device/tiny-imagenet-200-sample.zip}
if [ "$SMOKE" = 1 ]; then
  [ -f "$SAMPLE" ] || SAMPLE=$ROOT/../shared/data/tiny-imagenet-200-sample.zip
  export DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  BUDGET=${BUDGET:-480}
  # stage limits (s), CPU rehearsal sizes
  L_INSTALL=60 L_VERSIONS=60 L_TESTS=90 L_THROUGHPUT=90 L_FETCH=120 L_STUDY=90 L_CURVES=90
  F_FETCH=20 F_STUDY=30 F_CURVES=30
  STUDY_ARGS="--n-trials 4 --epochs 2" CURVE_EPOCHS=2 SPEC_WIDTH=8 SPEC_BATCH=32
  TINY_SUBSET="--subset-classes 10 --subset-per-class 3"
  THROUGHPUT_ARGS="--smoke"
else
  export DEVICE=cuda
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}  # the checkout first: the code under test
  BUDGET=${BUDGET:-470}
  L_INSTALL=90 L_VERSIONS=30 L_TESTS=200 L_THROUGHPUT=240 L_FETCH=60 L_STUDY=70 L_CURVES=70
  F_FETCH=20 F_STUDY=40 F_CURVES=45
  STUDY_ARGS="--n-trials 4 --epochs 3" CURVE_EPOCHS=5 SPEC_WIDTH= SPEC_BATCH=
  TINY_SUBSET=""
  THROUGHPUT_ARGS="--compile-budget-s 100"
fi
export SAMPLE DLOPS_TINY_IMAGENET_SAMPLE=$SAMPLE OUT WORK ROOT SMOKE STUDY_ARGS CURVE_EPOCHS SPEC_WIDTH SPEC_BATCH TINY_SUBSET THROUGHPUT_ARGS
RESERVE=15  # seconds kept for the summary
START=$(date +%s)
FAILED=0

want() { [ "$STAGES" = all ] || [[ ",$STAGES," == *",$1,"* ]]; }
# The limits above add up to more than the budget, and a stage's limit is cut to what is left.
# The seconds each later stage is sure of (its floor) are held back from the stages before it,
# so a slow or hanging test or benchmark is cut short rather than leave the studies and the
# curves (the validation figures) no time at all.
ORDER=(install versions cuda_tests throughput fetch study_ce study_triplet study_center curves)
floor() { case $1 in fetch) echo "$F_FETCH" ;; study_*) echo "$F_STUDY" ;; curves) echo "$F_CURVES" ;; *) echo 0 ;; esac; }
held_back() {  # the floors of the wanted stages after stage $1
  local s after=0 sum=0
  for s in "${ORDER[@]}"; do
    if [ "$after" = 1 ] && want "$s"; then sum=$((sum + $(floor "$s"))); fi
    [ "$s" = "$1" ] && after=1
  done
  echo "$sum"
}
pack() { tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs specs $( [ -f "$WORK/versions.json" ] && echo versions.json ) \
             $( [ -f "$WORK/stages.tsv" ] && echo stages.tsv ) 2>/dev/null; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/stages.tsv"; }

# A stage: a bash function run under `timeout`; its exit status 99 means "skipped, with the reason printed".
stage() {
  local name=$1 limit=$2 fn=$3
  want "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped (the run's budget of ${BUDGET}s is spent)"
    record "$name" skipped 0 0
    return 0
  fi
  local mine=$(( left - $(held_back "$name") ))
  [ "$mine" -lt 10 ] && mine=10
  [ "$mine" -lt "$left" ] && left=$mine
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  case $rc in
    0) status=ok ;;
    99) status=skipped; rc=0 ;;
    124|137) status=timeout; FAILED=1 ;;
    *) status=failed; FAILED=1 ;;
  esac
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
  echo "== $name: $status (rc $rc, ${secs}s)"
  record "$name" "$status" "$rc" "$secs"
  pack
}

install_stage() {
  if [ "$SMOKE" = 1 ]; then
    "$PYTHON" benchmarks/device_helpers.py install --wheels device/wheels --target "$WORK/site" --dry-run
  else
    PYTHONPATH= "$PYTHON" benchmarks/device_helpers.py install --wheels device/wheels --target "$SITE"
  fi
}
versions_stage() {
  "$PYTHON" benchmarks/device_helpers.py versions --out "$WORK/versions.json" || return
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not here"
}
tests_stage() {
  "$PYTHON" -m pytest -m cuda tests/test_cuda.py -v -rs -p no:cacheprovider --timeout 150 --junitxml "$WORK/logs/cuda_tests.xml"
}
throughput_stage() {
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/throughput.py $THROUGHPUT_ARGS --json "$OUT/throughput.json"
}
fetch_stage() {
  if [ ! -f "$SAMPLE" ]; then echo "no Tiny ImageNet sample at $SAMPLE: the studies and curves run on digits"; exit 99; fi
  "$PYTHON" -m dlops.cli data fetch tiny-imagenet --source "$SAMPLE"
}
dataset_args() {
  if [ -f "${DLOPS_DATA:-$DLOPS_HOME/data}/tiny-imagenet/cache/manifest.json" ]; then
    echo "--dataset tiny-imagenet $TINY_SUBSET"
  else
    echo "--dataset digits --subset-per-class 10"
  fi
}
study_stage() {  # $LOSS
  local spec="$WORK/specs/resnet18-$LOSS.toml"
  "$PYTHON" benchmarks/device_helpers.py spec --loss "$LOSS" --out "$spec" ${SPEC_WIDTH:+--width $SPEC_WIDTH} ${SPEC_BATCH:+--batch-size $SPEC_BATCH} || return
  # shellcheck disable=SC2046,SC2086
  "$PYTHON" -m dlops.cli study run "$spec" $(dataset_args) $STUDY_ARGS --device "$DEVICE" \
    --storage "sqlite:///$WORK/studies.db" --study-name "device-$LOSS" --seed 0
  local rc=$?
  cp "$WORK/studies.db" "$OUT/studies.db"  # OUT keeps one file (the study locks stay in WORK)
  return $rc
}
curves_stage() {
  local ds; ds=$(dataset_args)
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/device_helpers.py curves --storage "sqlite:///$WORK/studies.db" --spec-dir "$WORK/specs" \
    $ds --epochs "$CURVE_EPOCHS" --device "$DEVICE" --out-json "$OUT/curves.json" --out-png "$OUT/curves.png"
}
export -f install_stage versions_stage tests_stage throughput_stage fetch_stage dataset_args study_stage curves_stage

echo "dlops device run: $( [ "$SMOKE" = 1 ] && echo "CPU rehearsal (--smoke)" || echo GPU ), budget ${BUDGET}s, stages $STAGES, out $OUT, work $WORK"
stage install "$L_INSTALL" install_stage
stage versions "$L_VERSIONS" versions_stage
stage cuda_tests "$L_TESTS" tests_stage
stage throughput "$L_THROUGHPUT" throughput_stage
stage fetch "$L_FETCH" fetch_stage
for LOSS in ce triplet center; do
  export LOSS
  stage "study_$LOSS" "$L_STUDY" study_stage
done
stage curves "$L_CURVES" curves_stage

timeout -k 5 60 "$PYTHON" benchmarks/device_helpers.py summary --work "$WORK" --out "$OUT" > "$WORK/logs/summary.log" 2>&1 || FAILED=1
pack
echo "total $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$WORK/logs/summary.log"
exec >&- 2>&-  # tee reads to the end of its input, writes it out and ends
wait "$TEE"
exit "$FAILED"
