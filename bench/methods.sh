#!/usr/bin/env bash
# The "Methods on the embedded data" table of BENCHMARKS.md: every method of loft_dist/algorithms on the tiny
# demo config (2 rounds), offline and, where a method pseudo-labels, online, with the config's adapter (LoRA); the
# LoFT paper's pairs again with AdaptFormer (the adapter every paper config uses); then `loft-dist compare`.
#
#   bash bench/methods.sh [OUT_DIR]        # default runs/methods; prints OUT_DIR/compare/compare.md
#
# All runs share one prepared dataset (data.root), so they are evaluated on the same test split.
set -euo pipefail
out="${1:-runs/methods}"
mkdir -p "$out"
loft-dist prepare configs/tiny.yaml "data.root=$out/data"
runs=()
for case in zero_shot:offline lp:offline lft:offline fft:offline fixmatch:offline loft:offline loft_ow:offline \
            ulfine:offline fixmatch:online loft:online loft_ow:online ulfine:online \
            lft:offline:adaptformer loft:offline:adaptformer loft_ow:offline:adaptformer; do
  IFS=: read -r name mode adapter <<<"$case"
  run="$name-$mode${adapter:+-$adapter}"
  if [ ! -f "$out/$run/report/report.md" ]; then  # a finished run is kept; an interrupted one resumes
    loft-dist run configs/tiny.yaml "run.storage_path=$out" "run.name=$run" "data.root=$out/data" \
      "algorithm.name=$name" "algorithm.mode=$mode" ${adapter:+"peft.method=$adapter"} >"$out/$run.log" 2>&1 \
      || { echo "$run failed; see $out/$run.log" >&2; exit 1; }
  fi
  echo "$run: $(tail -1 "$out/$run.log")"
  runs+=("$out/$run")
done
loft-dist compare "${runs[@]}" --out "$out/compare"
