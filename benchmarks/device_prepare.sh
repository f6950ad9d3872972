#!/usr/bin/env bash
# Prepare what travels to the GPU machine for benchmarks/device_run.sh, here (where PyPI
# is reachable): into the git-ignored folder device/ at the repository root,
#   device/wheels/   wheels for Python 3.12 on manylinux x86-64 of every package dlops
#                    and its tests need beyond torch, numpy, matplotlib, scikit-learn,
#                    scipy and pillow (the GPU machine has those with its PyTorch); the
#                    versions installed here, dependencies included. device_run.sh
#                    installs only those whose distribution is missing there.
#   device/tiny-imagenet-200-sample.zip   the real Tiny ImageNet sample
# Then it prints the size of what travels (the tracked tree + device/; the limit is
# 64 MiB), the carry list and the command for the device tool.
#
#   bash benchmarks/device_prepare.sh [SAMPLE_ZIP]      # default ../shared/data/tiny-imagenet-200-sample.zip
# Environment: PYTHON (default .venv/bin/python, else python3): the Python whose
# installed versions are fetched; it needs pip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SAMPLE=${1:-$ROOT/../shared/data/tiny-imagenet-200-sample.zip}
DEST=device
LIMIT=$((64 * 1024 * 1024))

grep -qx '/device/' .gitignore || { echo "/device/ is not in .gitignore: it must not be committed" >&2; exit 1; }
mkdir -p "$DEST/wheels"

mapfile -t NEEDED < <(PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" benchmarks/device_helpers.py wheels-needed)
echo "wheels for ${#NEEDED[@]} distributions: ${NEEDED[*]}"
# pip matches manylinux_2_N exactly: name the usual N (newest first).
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
rm -f "$DEST"/wheels/*.whl
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST/wheels" "${NEEDED[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
count=$(ls "$DEST"/wheels/*.whl | wc -l)
[ "$count" -eq "${#NEEDED[@]}" ] || { echo "expected ${#NEEDED[@]} wheels, got $count" >&2; exit 1; }

if [ -f "$SAMPLE" ]; then
  cp "$SAMPLE" "$DEST/tiny-imagenet-200-sample.zip"
else
  echo "no Tiny ImageNet sample at $SAMPLE: the GPU run's sample stages will skip" >&2
  rm -f "$DEST/tiny-imagenet-200-sample.zip"
fi

tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
wheels=$(du -sb "$DEST/wheels" | cut -f1)
sample=$(stat -c %s "$DEST/tiny-imagenet-200-sample.zip" 2>/dev/null || echo 0)
total=$((tracked + untracked + wheels + sample))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "travels: tracked files $(mib "$tracked"), untracked not ignored $(mib "$untracked"), device/wheels $(mib "$wheels") ($count wheels), sample $(mib "$sample"): total $(mib "$total") of 64 MiB"
if [ "$total" -ge "$LIMIT" ]; then
  echo "TOO LARGE for one run (64 MiB): leave the sample out or split the wheels" >&2
  exit 1
fi
# The GPU machine's copy of the tree has no .git: the commit goes along in the command.
commit=$(git rev-parse HEAD)$( [ -n "$(git status --porcelain --untracked-files=no)" ] && echo +dirty || true)
cat <<EOF

On the GPU session (device tool, one call; the script keeps itself within about 8 minutes):
  carry:     ["device"]
  timeout_s: 560
  command:   DLOPS_GIT_COMMIT=$commit bash benchmarks/device_run.sh "\$OUT"
A second call for a part only, e.g.: DLOPS_GIT_COMMIT=$commit bash benchmarks/device_run.sh "\$OUT" --stages install,fetch,studies,curves
(stages: install versions cuda_tests throughput fetch studies curves; summary always runs; a fresh
machine needs install, and studies and curves need fetch, else they run on digits)
EOF
