#!/usr/bin/env bash
# The "Methods" tables of BENCHMARKS.md: every method of loft_dist/algorithms on the tiny demo config (2 rounds),
# offline and, where a method pseudo-labels, online, with the config's adapter (LoRA); the LoFT paper's pairs again
# with AdaptFormer (the adapter every paper config uses); then `loft-dist compare`, which averages the seeds of
# each case (mean and spread).
#
#   bash bench/methods.sh [OUT_DIR] [KEY=VALUE ...]   # default runs/methods; prints OUT_DIR/compare/compare.md
#   SEEDS="0 1 2" bash bench/methods.sh runs/methods-standin model.pretrained=standin algorithm.zs_threshold=0.4
#   CASES="lft:offline loft:offline" bash bench/methods.sh ...   # a subset of the cases below
#
# KEY=VALUE overrides go to every run (the stand-in: model.pretrained=standin, built on first use; its logit scale
# is about 12, not CLIP's 100, so LoFT-OW's zero-shot filter takes zs_threshold 0.4). SEEDS are run.seed values,
# seed-major: every case of a seed runs before the next seed. run.seed also draws the dataset's splits, so each seed
# has its own prepared dataset (data-s<seed>), which every case of that seed shares: within a seed, all methods are
# evaluated on the same test split; the spread over seeds includes the splits, as in the papers' repeated trials.
set -euo pipefail
out="${1:-runs/methods}"
shift || true
overrides=("$@")
seeds="${SEEDS:-0}"
cases="${CASES:-zero_shot:offline lp:offline lft:offline fft:offline fixmatch:offline loft:offline loft_ow:offline \
ulfine:offline fixmatch:online loft:online loft_ow:online ulfine:online \
lft:offline:adaptformer loft:offline:adaptformer loft_ow:offline:adaptformer}"
mkdir -p "$out"
runs=()
for seed in $seeds; do
  loft-dist prepare configs/tiny.yaml "data.root=$out/data-s$seed" "run.seed=$seed" ${overrides[@]+"${overrides[@]}"}
  for case in $cases; do
    IFS=: read -r name mode adapter <<<"$case"
    run="$name-$mode${adapter:+-$adapter}-s$seed"
    if [ ! -f "$out/$run/report/report.md" ]; then  # a finished run is kept; an interrupted one resumes
      start=$(date +%s)
      loft-dist run configs/tiny.yaml "run.storage_path=$out" "run.name=$run" "data.root=$out/data-s$seed" "run.seed=$seed" \
        "algorithm.name=$name" "algorithm.mode=$mode" ${adapter:+"peft.method=$adapter"} \
        ${overrides[@]+"${overrides[@]}"} >"$out/$run.log" 2>&1 \
        || { echo "$run failed; see $out/$run.log" >&2; exit 1; }
      echo "$run: $(( $(date +%s) - start )) s" >>"$out/walls.txt"
    fi
    echo "$run: $(tail -1 "$out/$run.log")"
    runs+=("$out/$run")
  done
done
loft-dist compare "${runs[@]}" --out "$out/compare"
