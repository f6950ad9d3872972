#!/usr/bin/env bash
# The README's digits reference runs, end to end on a fresh $DLOPS_HOME: an N-trial study
# per loss, each study's best trial retrained with `dlops final` (S seeds, E epochs, one
# test evaluation per seed), the autoencoder study and its final run, then `dlops report`.
# Prints one summary line per spec from its final.json. The studies are named SPEC-digits
# (resnet18-ce-digits, ..., autoencoder-digits): digits is not the specs' own dataset.
#
#   bash benchmarks/reference_digits.sh                 # 8 trials, 2 seeds, 10 final epochs
#   TRIALS=3 SEEDS=1 EPOCHS=2 bash benchmarks/reference_digits.sh   # a quick look
set -euo pipefail
export DLOPS_HOME="${DLOPS_HOME:-$(mktemp -d -t dlops-reference-XXXX)}"
TRIALS="${TRIALS:-8}"
SEEDS="${SEEDS:-2}"
EPOCHS="${EPOCHS:-10}"
DLOPS="${DLOPS:-dlops}"
PYTHON="${PYTHON:-python}"
mkdir -p "$DLOPS_HOME"
echo "DLOPS_HOME=$DLOPS_HOME trials=$TRIALS seeds=$SEEDS final epochs=$EPOCHS"

stamp() { date +%s; }
declare -A took
for loss in ce triplet center; do
  t0=$(stamp)
  "$DLOPS" study run --loss "$loss" --dataset digits --n-trials "$TRIALS" > "$DLOPS_HOME/study-$loss.log"
  t1=$(stamp)
  "$DLOPS" final --loss "$loss" --dataset digits --seeds "$SEEDS" --epochs "$EPOCHS" > "$DLOPS_HOME/final-$loss.log"
  took[$loss]="study $((t1 - t0)) s, final $(( $(stamp) - t1 )) s"
done
t0=$(stamp)
"$DLOPS" study run autoencoder --dataset digits --n-trials "${AE_TRIALS:-3}" > "$DLOPS_HOME/study-autoencoder.log"
t1=$(stamp)
"$DLOPS" final autoencoder --dataset digits --seeds "$SEEDS" > "$DLOPS_HOME/final-autoencoder.log"
took[autoencoder]="study $((t1 - t0)) s, final $(( $(stamp) - t1 )) s"
"$DLOPS" report > "$DLOPS_HOME/report.log"

for spec in resnet18-ce resnet18-triplet resnet18-center autoencoder; do
  key="${spec#resnet18-}"
  TOOK="${took[$key]}" "$PYTHON" - "$DLOPS_HOME/reports/$spec/final.json" <<'PY'
import json, os, sys
f = json.load(open(sys.argv[1]))
m, s = f["mean"], f["std"]
src = f["params_source"]
params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in f["params"].items())
where = f"trial {src['trial']}" if src.get("kind") == "trial" else src.get("kind")
print(f"{f['spec']}: {where} ({params}); {f['epochs']} epochs x {len(f['seeds'])} seeds: "
      f"test top-1 {m['test_top1']:.4f} ± {s['test_top1']:.4f}, top-5 {m['test_top5']:.4f} ± {s['test_top5']:.4f}; "
      f"{os.environ['TOOK']}")
PY
done
echo "reports: $DLOPS_HOME/reports/index.md"
