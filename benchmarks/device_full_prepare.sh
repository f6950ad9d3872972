#!/usr/bin/env bash
# Prepare benchmarks/device_full.sh here (where PyPI is reachable): the wheels into device/wheels
# (benchmarks/device_prepare.sh), the full Tiny ImageNet archive cut into parts under
# device/full/, and the device calls that carry them, each within the 64 MiB a call takes.
#
#   bash ../shared/tools/tiny-imagenet-full.sh MIRROR_GIT_DIR /tmp/tiny-imagenet-200.zip
#   bash benchmarks/device_full_prepare.sh /tmp/tiny-imagenet-200.zip [--part-mib 48]
#
# The archive that tiny-imagenet-full.sh rebuilds has md5 fd10ccb2f97c150dad695a081b22f49a;
# another one is cut all the same, with a warning. The calls are printed last: the same
# command every time, each with its own carry list; make them one after another, so the
# machine stays warm (30 s) and keeps the parts. The last one joins, installs, fetches and
# starts the runs; a call with nothing carried continues what a call's budget cut off.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 ARCHIVE_ZIP [--part-mib MIB]" >&2; exit 2; }
ZIP=$(realpath "$1"); shift
PART_MIB=48
[ "${1:-}" = --part-mib ] && PART_MIB=$2
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
REBUILT_MD5=fd10ccb2f97c150dad695a081b22f49a

grep -qx '/device/' .gitignore || { echo "/device/ is not in .gitignore: it must not be committed" >&2; exit 1; }
[ -f "$ZIP" ] || { echo "no archive at $ZIP" >&2; exit 1; }
md5=$(md5sum "$ZIP" | cut -d' ' -f1)
[ "$md5" = "$REBUILT_MD5" ] || echo "warning: $ZIP has md5 $md5, not the rebuilt archive's $REBUILT_MD5" >&2

# The wheels only: the sample stays out (it would take the room of a part).
bash benchmarks/device_prepare.sh /nonexistent-sample.zip > /tmp/dlops-device-prepare.log 2>&1 \
  || { cat /tmp/dlops-device-prepare.log >&2; exit 1; }
grep '^wheels for' /tmp/dlops-device-prepare.log
rm -f device/tiny-imagenet-200-sample.zip

"$PYTHON" benchmarks/device_parts.py split "$ZIP" device/full --part-mib "$PART_MIB"
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
commit=$(git rev-parse HEAD)$( [ -n "$(git status --porcelain --untracked-files=no)" ] && echo +dirty || true)
mapfile -t CALLS < <("$PYTHON" benchmarks/device_parts.py plan device/full --extra device/wheels \
  --base-bytes $((tracked + untracked)) --limit-mib 63)

echo
echo "Device calls (device tool, one after another; the tree itself is $(( (tracked + untracked) / 1024 )) KiB):"
n=${#CALLS[@]}
for i in "${!CALLS[@]}"; do
  timeout=120
  [ "$i" -eq $((n - 1)) ] && timeout=600
  echo "  call $((i + 1)) of $n: carry ${CALLS[$i]}  timeout_s: $timeout"
done
echo "  then, while runs are left: carry []  timeout_s: 600"
echo "  command (every call): DLOPS_GIT_COMMIT=$commit bash benchmarks/device_full.sh \"\$OUT\""
echo "  (--runs ce,triplet,center,original picks runs; --epochs 15 is the default)"
