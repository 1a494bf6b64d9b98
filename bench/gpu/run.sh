#!/usr/bin/env bash
# The GPU kit on the device: install the carried wheels offline, check the imports, run the parts (kit.py).
#   bash bench/gpu/run.sh [--dry-run] [--ray] [kit.py options, e.g. --parts score-bf16 --budget 300]
# Carry bench/gpu/wheels (fetch_wheels.sh; with --ray also fetch_ray.sh; git-ignored). Results: $OUT/gpu_kit.{json,md}.
# --dry-run lists what it would install and installs nothing; --ray adds Ray (trimmed) and the ray-* parts;
# --cpu runs the CPU profile (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=${KIT_WHEELS:-bench/gpu/wheels}
SITE=${KIT_SITE:-${TMPDIR:-/tmp}/loft_dist_gpu_kit/site}
DRY=0 RAY=() ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --ray) RAY=(--ray); ARGS+=("$arg") ;;
    *) ARGS+=("$arg") ;;
  esac
done
if (( DRY )); then
  exec "$PY" bench/gpu/install.py --wheels "$WHEELS" --target "$SITE" "${RAY[@]}" --dry-run
fi
t0=$SECONDS
"$PY" bench/gpu/install.py --wheels "$WHEELS" --target "$SITE" "${RAY[@]}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # loft_dist runs from the working tree, as source
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
if [[ " ${ARGS[*]} " == *" --cpu "* ]]; then export DS_ACCELERATOR=cpu; else export DS_ACCELERATOR=cuda; fi
KIT_RAY=${#RAY[@]} "$PY" - <<'PY'
import os
import torch, open_clip, omegaconf, deepspeed, peft, pyarrow, safetensors  # noqa: F401 - what the kit imports
import loft_dist.scoring.scorer, loft_dist.train.deepspeed_config  # noqa: F401 - without Ray
if os.environ["KIT_RAY"] != "0":
    import ray, ray.data, ray.train.torch  # noqa: F401
    print(f"kit: ray {ray.__version__} from {os.path.dirname(ray.__file__)}")
if os.environ["DS_ACCELERATOR"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    print(f"kit: torch {torch.__version__} on {torch.cuda.get_device_name(0)}, deepspeed {deepspeed.__version__}, "
          f"open_clip {open_clip.__version__}")
PY
echo "kit: installed and imported in $((SECONDS - t0)) s"
exec "$PY" bench/gpu/kit.py "${ARGS[@]}"
