#!/usr/bin/env bash
# Screenshots of what optuna-dashboard shows for a dlops study: the study page, the study's
# note, one trial's page (its note and per-epoch table) and a pruned trial's page, taken with
# headless Chromium.
# Not part of CI (it needs a browser: `apt-get install -y chromium` on Debian).
#
#   DLOPS_HOME=storage bash benchmarks/dashboard_screenshots.sh STUDY [TRIAL] [OUT_DIR]
#
# STUDY: a study in $DLOPS_STORAGE (default sqlite:///$DLOPS_HOME/dlops.db); TRIAL: a trial
# number (default: the best trial); OUT_DIR: default benchmarks/results/dashboard.
set -euo pipefail
STUDY="${1:?usage: dashboard_screenshots.sh STUDY [TRIAL] [OUT_DIR]}"
TRIAL="${2:-}"
OUT="${3:-benchmarks/results/dashboard}"
PORT="${PORT:-8093}"
DLOPS="${DLOPS:-dlops}"
PYTHON="${PYTHON:-python}"
CHROMIUM="${CHROMIUM:-chromium}"
SIZE="${SIZE:-1400,1800}"
mkdir -p "$OUT"

$DLOPS dashboard --port "$PORT" > /dev/null 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 180); do
  curl -sf "http://127.0.0.1:$PORT/api/studies" > /dev/null && break
  kill -0 "$SERVER" 2>/dev/null || break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/api/studies" > /dev/null || { echo "the dashboard did not start on port $PORT" >&2; exit 1; }

read -r STUDY_ID BEST PRUNED < <(curl -sf "http://127.0.0.1:$PORT/api/studies" | "$PYTHON" -c '
import json, sys, urllib.request
for s in json.load(sys.stdin)["study_summaries"]:
    if s["study_name"] == sys.argv[1]:
        url = "http://127.0.0.1:%s/api/studies/%s" % (sys.argv[2], s["study_id"])
        detail = json.load(urllib.request.urlopen(url))
        best = detail["best_trials"][0]["number"] if detail["best_trials"] else 0
        pruned = [t["number"] for t in detail["trials"] if t["state"] == "Pruned"]
        print(s["study_id"], best, pruned[0] if pruned else "")
        break
else:
    sys.exit(f"no study {sys.argv[1]!r}")
' "$STUDY" "$PORT")
TRIAL="${TRIAL:-$BEST}"

shot() {  # URL PNG
  local profile
  profile="$(mktemp -d)"
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --virtual-time-budget=20000 \
    --window-size="$SIZE" --screenshot="$2" "$1" > /dev/null 2>&1
  rm -rf "$profile"
  echo "$2: $1"
}
BASE="http://127.0.0.1:$PORT/dashboard/studies/$STUDY_ID"
SIZE="${SIZE%,*},3000" shot "$BASE" "$OUT/study.png"   # tall: the plots, then Study Artifacts
shot "$BASE/note" "$OUT/study-note.png"
shot "$BASE/trials?numbers=$TRIAL" "$OUT/trial.png"
if [ -n "$PRUNED" ]; then shot "$BASE/trials?numbers=$PRUNED" "$OUT/trial-pruned.png"; fi
