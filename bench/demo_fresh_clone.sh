#!/usr/bin/env bash
# README command 1 as a new user runs it, timed (BENCHMARKS.md "The demo on the stand-in"): a fresh clone of this
# checkout's HEAD, a venv over the machine's packages (pip then installs loft_dist only), an empty model cache (the
# demo builds the stand-in first) and no RAY_ADDRESS. Usage: bash bench/demo_fresh_clone.sh [WORK_DIR]
set -u
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=${1:-/tmp/loft-demo-fresh}
rm -rf "$work" && mkdir -p "$work" && cd "$work"
git clone -q "$src" repo && cd repo && git log --oneline -1 | cut -c1-80
python -m venv --system-site-packages "$work/venv"
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv" LOFT_DIST_CACHE="$work/cache" PIP_DISABLE_PIP_VERSION_CHECK=1
unset RAY_ADDRESS PYTHONPATH
command1=$(sed -n '/^## Two commands/,/^## /p' README.md | grep -m1 'loft-dist demo')
echo "README command 1: $command1"
t0=$(date +%s.%N)
bash -c "${command1% && loft-dist demo}" > "$work/pip.log" 2>&1 || { echo "install failed: $work/pip.log"; exit 1; }
t1=$(date +%s.%N)
loft-dist demo > "$work/demo.log" 2>&1; rc=$?
t2=$(date +%s.%N)
echo "rc=$rc install=$(echo "$t1 - $t0" | bc) s demo=$(echo "$t2 - $t1" | bc) s (log: $work/demo.log)"
grep -E "stand-in build: step [0-9]+/[0-9]+,.* ETA 0 s|phase .* done in|round [0-9]+ eval: accuracy" "$work/demo.log"
tail -1 "$work/demo.log"
