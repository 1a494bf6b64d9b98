"""GPU kit (issue 18): the compute that runs inside Ray, measured on one GPU without Ray, against plain PyTorch.

Parts, each in its own process with its own time limit (a stuck part costs its limit, not the budget):
  score-fp32, score-bf16    the Scorer class (loft_dist/scoring/scorer.py) called on batches as an actor gets them
                            (uint8 pixels in numpy), against the GPU's peak: the same model's forward on synthetic
                            tensors already on the device; bf16 = torch.autocast around both. score-fp32 also times
                            the peak with TF32 matmuls allowed (loft_dist never allows them).
  step-adaptformer, step-lora
                            the DeepSpeed engine step (train/deepspeed_config.py build_engine, 1 rank, NCCL; bf16)
                            as train/loop.py runs it, against the same step in a plain torch loop: autocast bf16 on
                            fp32 weights (the idiomatic plain loop, the headline; what train.precision=bf16 runs) and
                            bf16 weights (a lower bound: no fp32 master weights). Same model, loss, optimizer and batch, already on the device.
                            Also train/loop.py's own epoch function on CPU batches: the engine step plus the loop's
                            host → device copies (pageable; inside Ray Train, Ray's iterator makes them) and its
                            per-step counts (device → host syncs).
  ray-score, ray-train      with --ray (ray_parts.py): the actor-pool scoring job and a Ray Train worker, on Ray
                            trimmed to fit the carry limit (fetch_ray.sh; run.sh --ray installs it).

The model is the paper config's (configs/cifar100_lt_loft.yaml: ViT-B/16 quickgelu at 224 px, 100 classes, AdaptFormer
r = auto, LoFT loss, SGD, no clipping) with random weights; lora swaps peft.method. Writes gpu_kit.json and gpu_kit.md
to --out (default $OUT, else bench/gpu/out).

    bash bench/gpu/run.sh [--ray]              # on the GPU machine: installs the carried wheels, then this (< 8 min)
    python bench/gpu/kit.py --cpu              # here: the same parts on CPU, tiny model, few iterations (logic only)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # loft_dist travels as source (PYTHONPATH=. on the device), never pip-installed

PARTS = ("score-fp32", "score-bf16", "step-adaptformer", "step-lora")
RAY_PARTS = ("ray-score", "ray-train")  # --ray: with the trimmed Ray of fetch_ray.sh (ray_parts.py)
CONFIG = "configs/cifar100_lt_loft.yaml"
TARGETS = {"scoring_vs_peak": 0.7, "engine_vs_plain": 1.10}  # scorer >= 0.7 x peak; engine step <= 1.10 x plain


@dataclass
class Profile:
    """Sizes and time limits of one run: `gpu` (the device) or `cpu` (the logic check, tiny model)."""

    device: str
    model: str
    image_size: int
    classes: int
    score_batch: int
    micro: list = field(default_factory=list)
    warmup: int = 3
    seconds: float = 2.0  # each timed loop runs at least this long ...
    min_iters: int = 10  # ... and at least this many iterations
    part_timeout_s: float = 150.0
    ray_part_timeout_s: float = 180.0  # the ray-* parts start Ray (and, for ray-train, a Ray Train worker group)
    budget_s: float = 420.0  # all parts together; with run.sh's install, under the 8 minutes
    threads: int = 0  # torch threads in the step parts (0 = torch's default)


PROFILES = {
    "gpu": Profile("cuda", "ViT-B-16-quickgelu", 224, 100, score_batch=256, micro=[16, 64]),
    "cpu": Profile("cpu", "loft-tiny-vit", 32, 10, score_batch=32, micro=[8], warmup=1, seconds=0.0, min_iters=3,
                   part_timeout_s=180.0, ray_part_timeout_s=400.0, budget_s=1200.0, threads=1),
}


# ---------------------------------------------------------------- helpers shared by the parts


def make_cfg(p: Profile, *overrides: str):
    """The paper config with random weights, sized by the profile; validated by loft_dist's own load_config."""
    from loft_dist.config import load_config

    gpu = p.device == "cuda"
    cfg = load_config(str(REPO / CONFIG), [
        "data.source_path=/unused", "model.pretrained=''", f"model.name={p.model}", f"data.image_size={p.image_size}",
        f"scoring.batch_size={p.score_batch}", f"scoring.gpus_per_actor={1 if gpu else 0}", "train.num_workers=1",
        f"train.micro_batch_size={p.micro[0]}", f"train.use_gpu={str(gpu).lower()}", *overrides])
    # bf16 is the measured training precision on both profiles. The config check ties bf16 to train.use_gpu (a run
    # without a GPU must not ask for it); the CPU profile sets it after the check, to exercise the same code path.
    cfg.train.precision = "bf16"
    return cfg


def class_names(p: Profile) -> list[str]:
    return [f"class{i}" for i in range(p.classes)]


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, p: Profile) -> dict:
    """Mean seconds per call of fn after warm-up; the device is synchronised before the clock starts and stops."""
    for _ in range(p.warmup):
        fn()
    sync(p.device)
    n, t0 = 0, time.perf_counter()
    while n < p.min_iters or time.perf_counter() - t0 < p.seconds:
        fn()
        n += 1
    sync(p.device)
    return {"s_per_iter": (time.perf_counter() - t0) / n, "iters": n}


def autocast(device: str, precision: str):
    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def env_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for dist in ("deepspeed", "open_clip_torch", "peft", "omegaconf", "torchvision", "numpy"):
        try:  # metadata, not an import: a scoring part need not pay for importing deepspeed
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info


# ---------------------------------------------------------------- part: scoring


def score_part(p: Profile, precision: str) -> dict:
    """Scorer.__call__ on actor-like batches vs the same model's forward on a synthetic batch already on the device."""
    import numpy as np
    import torch

    from loft_dist.algorithms import inference_logits
    from loft_dist.config import to_dict
    from loft_dist.data.transforms import normalize
    from loft_dist.scoring.scorer import Scorer

    gpu = p.device == "cuda"  # on the GPU the Scorer autocasts itself (scoring.precision); the CPU check wraps it
    cfg = make_cfg(p, f"scoring.precision={precision if gpu else 'fp32'}")
    scorer = Scorer(to_dict(cfg), class_names(p), "zero_shot")  # sets torch threads from scoring.torch_threads
    if scorer.device != p.device:
        raise RuntimeError(f"the Scorer chose {scorer.device!r}, the profile needs {p.device!r}")
    B, S = p.score_batch, p.image_size
    rng = np.random.default_rng(0)
    # What a scoring actor receives from Ray Data (scoring/job.py decodes with normalized=False): uint8 pixels.
    batch = {"id": np.arange(B, dtype=np.int64), "image": rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8),
             "true_label": np.full(B, -1, np.int32), "error": np.full(B, "", dtype=object)}
    x = torch.randn(B, 3, S, S, device=p.device)

    def peak():
        with torch.inference_mode(), autocast(p.device, precision):
            inference_logits(cfg.algorithm, scorer.model, x, "zero_shot")

    def score():
        with autocast(p.device, precision) if not gpu else contextlib.nullcontext():
            assert scorer(batch).num_rows == B

    out = {"precision": precision, "batch": B, "image_size": S, "model": p.model, "classes": p.classes,
           "peak": timed(peak, p), "scorer": timed(score, p)}
    if precision == "fp32" and p.device == "cuda":  # what allowing TF32 would give the fp32 forward
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        out["peak_tf32"] = timed(peak, p)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    # Where the scorer's time goes besides the forward: numpy's normalisation (the scorer's path before it moved to
    # the device), the float32 pageable copy it needed, and the uint8 pinned copy + device normalisation of now.
    normalized = normalize(batch["image"])
    out["normalize_cpu"] = timed(lambda: normalize(batch["image"]), p)
    out["host_to_device"] = timed(lambda: torch.from_numpy(normalized).to(p.device), p)
    out["scorer_images"] = timed(lambda: scorer._images(batch["image"]), p)
    for k in ("peak", "peak_tf32", "scorer"):
        if k in out:
            out[k]["images_s"] = B / out[k]["s_per_iter"]
    out["ratio_scorer_vs_peak"] = out["scorer"]["images_s"] / out["peak"]["images_s"]
    if p.device == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---------------------------------------------------------------- part: training step


def step_batch(p: Profile, micro: int, C: int) -> dict:
    """A micro batch of an offline round on the device: labeled, hard and soft pseudo-labeled rows in turn."""
    import torch

    from loft_dist.algorithms.loft import HARD, LABELED, SOFT

    g = torch.Generator().manual_seed(micro)
    codes = torch.tensor([LABELED, HARD, SOFT], dtype=torch.int8).repeat(math.ceil(micro / 3))[:micro]
    b = {"image": torch.randn(micro, 3, p.image_size, p.image_size, generator=g), "code": codes,
         "target": torch.randint(0, C, (micro,), generator=g), "weight": torch.ones(micro),
         "soft": torch.softmax(torch.randn(micro, C, generator=g), -1)}
    return {k: v.to(p.device) for k, v in b.items()}


def plain_step(model, b: dict, prior, cfg, in_dtype, precision: str):
    """One step of the plain torch loop: forward (autocast bf16, or bf16 weights), LoFT loss in fp32, SGD."""
    import torch

    from loft_dist.algorithms import method_of

    method, a = method_of(cfg.algorithm), cfg.algorithm
    params = [q for q in model.parameters() if q.requires_grad]
    t = cfg.train
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    x = b["image"].to(in_dtype)

    def step():
        with autocast(b["image"].device.type, precision):
            out = model(x)
        out = out.float()
        loss, _ = method.loss(out, b["code"], b["target"], b["weight"], b["soft"], prior, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        method.after_step(model, out, b["code"], b["target"], b["soft"], a)

    return step


def engine_step(engine, b: dict, prior, cfg):
    """One step as train/loop.py's train_loop_per_worker runs it (offline mode), on a batch already on the device."""
    from loft_dist.algorithms import method_of

    method, a = method_of(cfg.algorithm), cfg.algorithm
    x = b["image"]  # fp32: the engine autocasts (train.precision=bf16 → DeepSpeed's torch_autocast)

    def step():
        out = engine(x).float()
        loss, _ = method.loss(out, b["code"], b["target"], b["weight"], b["soft"], prior, a)
        engine.backward(loss)
        engine.step()
        method.after_step(engine.module, out, b["code"], b["target"], b["soft"], a)

    return step


def loop_epoch(engine, b: dict, prior, cfg, steps: int) -> dict:
    """train/loop.py's own epoch function (_train_epoch) over `steps` copies of the batch, as CPU tensors: the engine
    step plus what the loop adds per step (host → device copies, its per-step counts); timed by the loop itself."""
    from loft_dist.algorithms import method_of
    from loft_dist.train.loop import _train_epoch

    method = method_of(cfg.algorithm)
    cpu = {k: v.cpu() for k, v in b.items()}  # the same micro batch of CPU tensors, as Ray Data hands them over
    _train_epoch(engine, method, [cpu] * 2, None, cfg, prior)  # warm-up
    sums = _train_epoch(engine, method, [cpu] * steps, None, cfg, prior)
    return {"s_per_iter": sums["compute_s"] / sums["steps"], "iters": int(sums["steps"]),
            "data_wait_s": sums["data_wait_s"] / sums["steps"]}


def init_process_group(p: Profile) -> None:
    """One rank, as build_engine expects the group to exist already (Ray Train's inside a worker): env:// rendezvous."""
    import deepspeed
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if p.device == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if p.device == "cuda" else "gloo")


def step_part(p: Profile, method: str) -> dict:
    """Plain torch steps (two bf16 flavours) vs the DeepSpeed engine's bf16 step, per micro batch size."""
    import torch

    from loft_dist.algorithms import load_model
    from loft_dist.models.clip import trainable_summary
    from loft_dist.train.deepspeed_config import build_engine

    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = make_cfg(p, f"peft.method={method}", *(["peft.r=8"] if method == "lora" else []))
    names = class_names(p)
    base = load_model(cfg, names, None).train()  # built once; every path trains its own deep copy
    prior = torch.full((len(names),), 1.0 / len(names), device=p.device)
    out = {"method": method, "precision": "bf16", "model": p.model, "image_size": p.image_size,
           "trainable": trainable_summary(base), "grad_clip": cfg.train.grad_clip, "micro": {}}
    plains = {"plain_autocast": (torch.float32, "bf16"), "plain_bf16_weights": (torch.bfloat16, "fp32")}
    for micro in p.micro:
        b = step_batch(p, micro, len(names))
        row = {}
        for name, (weights, amp) in plains.items():
            model = copy.deepcopy(base).to(p.device, dtype=weights)
            row[name] = timed(plain_step(model, b, prior, cfg, weights, amp), p)
            del model
        out["micro"][str(micro)] = row
    init_process_group(p)
    model = copy.deepcopy(base)
    params = [q for q in model.parameters() if q.requires_grad]
    t = cfg.train
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    engine, _ = build_engine(model, opt, params, t)
    out["engine"] = {"device": str(engine.device), "optimizer": type(engine.optimizer).__name__,
                     "module_dtype": str(next(engine.module.parameters()).dtype)}
    for micro in p.micro:
        row = out["micro"][str(micro)]
        b = step_batch(p, micro, len(names))
        row["engine"] = timed(engine_step(engine, b, prior, cfg), p)
        steps = max(p.min_iters, math.ceil(p.seconds / row["engine"]["s_per_iter"]))
        row["loop"] = loop_epoch(engine, b, prior, cfg, steps)
        for r in row.values():
            r["images_s"] = micro / r["s_per_iter"]
        row["ratio_engine_vs_plain"] = row["engine"]["s_per_iter"] / row["plain_autocast"]["s_per_iter"]
        row["ratio_loop_vs_plain"] = row["loop"]["s_per_iter"] / row["plain_autocast"]["s_per_iter"]
        row["ratio_engine_vs_bf16_weights"] = row["engine"]["s_per_iter"] / row["plain_bf16_weights"]["s_per_iter"]
        # the loop copies each batch to the device inside its step (a CPU tensor from Ray Data); not in the above
        cpu_x = torch.randn(micro, 3, p.image_size, p.image_size)
        row["host_to_device"] = timed(lambda: cpu_x.to(p.device, dtype=torch.bfloat16), p)
    if p.device == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_part(name: str, p: Profile) -> dict:
    kind, arg = name.split("-", 1)
    if kind == "ray":
        import ray_parts  # bench/gpu is this script's directory, first on sys.path

        result = ray_parts.run(arg, p)
    else:
        result = score_part(p, arg) if kind == "score" else step_part(p, arg)
    return {"env": env_info(), **result}


# ---------------------------------------------------------------- the driver: one process per part, then the report


def child_env(p: Profile) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    env["DS_ACCELERATOR"] = "cuda" if p.device == "cuda" else "cpu"
    env.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing is downloaded; fail at once if something tries
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray for the ray-* parts; no token notice
    return env


def spawn(name: str, profile: str, p: Profile, limit: float) -> dict:
    """Run one part in a fresh process; kill its whole process group at `limit` seconds."""
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "result.json"
        cmd = [sys.executable, __file__, "--part", name, "--profile", profile, "--result", str(res)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(p), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 and res.is_file() else f"error (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            status = f"timeout ({limit:.0f} s)"
        out = json.loads(res.read_text()) if status == "ok" else {}
    out.update(status=status, wall_s=time.perf_counter() - t0)
    if status != "ok":
        out["log_tail"] = log[-4000:]
    return out


def summarize(parts: dict) -> dict:
    """The ratios the issue asks for, with their targets."""
    s: dict = {"targets": TARGETS}
    sc = {k.split("-")[1]: v for k, v in parts.items() if k.startswith("score-") and v["status"] == "ok"}
    for prec, v in sc.items():
        s[f"scoring_vs_peak_{prec}"] = v["ratio_scorer_vs_peak"]
    if {"fp32", "bf16"} <= sc.keys():
        s["bf16_speedup_peak"] = sc["bf16"]["peak"]["images_s"] / sc["fp32"]["peak"]["images_s"]
        s["bf16_speedup_scorer"] = sc["bf16"]["scorer"]["images_s"] / sc["fp32"]["scorer"]["images_s"]
    if "peak_tf32" in sc.get("fp32", {}):
        s["tf32_speedup_peak"] = sc["fp32"]["peak_tf32"]["images_s"] / sc["fp32"]["peak"]["images_s"]
    s["engine_vs_plain"] = {k.split("-", 1)[1]: {m: r["ratio_engine_vs_plain"] for m, r in v["micro"].items()}
                            for k, v in parts.items() if k.startswith("step-") and v["status"] == "ok"}
    rs, rt = parts.get("ray-score", {}), parts.get("ray-train", {})
    if rs.get("status") == "ok":
        s["ray_job_vs_plain"], s["ray_steady_vs_plain"] = rs["ratio_job_vs_plain"], rs["ratio_steady_vs_plain"]
    same = parts.get("step-adaptformer", {}).get("micro", {}).get(str(rt.get("micro")), {})
    if rt.get("status") == "ok" and same:  # the worker's step vs the same code outside Ray, same micro batch
        s["ray_worker_vs_engine"] = rt["step_time_s"] / same["engine"]["s_per_iter"]
        s["ray_worker_vs_loop"] = rt["step_time_s"] / same["loop"]["s_per_iter"]
    scoring = [s[k] >= TARGETS["scoring_vs_peak"] for k in s if k.startswith("scoring_vs_peak_")]
    engine = [r <= TARGETS["engine_vs_plain"] for v in s["engine_vs_plain"].values() for r in v.values()]
    s["meets"] = {"scoring": all(scoring) if scoring else None, "engine": all(engine) if engine else None}
    return s


def markdown(report: dict) -> str:
    parts, env = report["parts"], report["env"]
    lines = [f"GPU kit, profile `{report['profile']}` ({env.get('gpu') or 'CPU'}), command `{report['command']}`, "
             f"{report['wall_s']:.0f} s. Versions: Python {env.get('python')}, torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}), deepspeed {env.get('deepspeed')}, open_clip {env.get('open_clip_torch')}, "
             f"peft {env.get('peft')}.", "",
             "| part | path | images/s | ms/iter | ratio | target |", "|---|---|---:|---:|---:|---|"]

    def row(part, path, r, ratio="", target=""):
        lines.append(f"| {part} | {path} | {r['images_s']:.1f} | {1e3 * r['s_per_iter']:.2f} | {ratio} | {target} |")

    for name, v in parts.items():
        if v["status"] != "ok":
            lines.append(f"| {name} | **{v['status']}** | | | | |")
            continue
        if name == "ray-score":
            lines.append(f"| ray-score ({v['model']}, {v['image_size']} px, {v['rows']} rows) | Scorer in one process "
                         f"(read, decode, score) | {v['plain_rows_s']:.1f} | | 1.00 | |")
            steady = f"steady {v['job_steady_rows_s']:.1f}/s, " if v["job_steady_rows_s"] else ""
            lines.append(f"| ray-score | actor-pool job end to end ({steady}start-up {v['job_startup_s']:.1f} s) | "
                         f"{v['job_rows_s']:.1f} | | **{v['ratio_job_vs_plain']:.2f}** | |")
            continue
        if name == "ray-train":
            ratio = report["summary"].get("ray_worker_vs_engine")
            lines.append(f"| ray-train (adaptformer, {v['precision']}, micro {v['micro']}) | Ray Train worker step "
                         f"(data wait {1e3 * v['data_wait_s']:.1f} ms apart) | {v['images_s']:.1f} | "
                         f"{1e3 * v['step_time_s']:.2f} | {f'**{ratio:.2f}** vs engine' if ratio else ''} | |")
            if ratio:
                lines[-1] = lines[-1][:-4] + f", {report['summary']['ray_worker_vs_loop']:.2f} vs loop | |"
            continue
        if name.startswith("score-"):
            tag = f"{name} ({v['model']}, {v['image_size']} px, batch {v['batch']})"
            row(tag, "peak: forward on a synthetic batch on the device", v["peak"], "1.00")
            if "peak_tf32" in v:
                row(tag, "peak with TF32 allowed", v["peak_tf32"],
                    f"{v['peak_tf32']['images_s'] / v['peak']['images_s']:.2f}")
            row(tag, "Scorer.__call__ (uint8 numpy batch)", v["scorer"], f"**{v['ratio_scorer_vs_peak']:.2f}**",
                f">= {TARGETS['scoring_vs_peak']}")
            continue
        for micro, r in v["micro"].items():
            tag = f"{name} (bf16, micro {micro})"
            row(tag, "plain torch: autocast bf16, fp32 weights", r["plain_autocast"], "1.00")
            row(tag, "plain torch: bf16 weights", r["plain_bf16_weights"],
                f"{r['plain_bf16_weights']['s_per_iter'] / r['plain_autocast']['s_per_iter']:.2f}")
            row(tag, "DeepSpeed engine (build_engine, 1 rank)", r["engine"], f"**{r['ratio_engine_vs_plain']:.2f}**",
                f"<= {TARGETS['engine_vs_plain']} (step time)")
            row(tag, "train/loop.py _train_epoch (engine + copies to the device + per-step counts)", r["loop"],
                f"{r['ratio_loop_vs_plain']:.2f}")
    s = report["summary"]
    extra = [f"{k} {s[k]:.2f}" for k in ("bf16_speedup_peak", "bf16_speedup_scorer", "tf32_speedup_peak") if k in s]
    if extra:
        lines += ["", "Speed-ups: " + ", ".join(extra) + "."]
    met = {k: {True: "yes", False: "no", None: "not measured"}[v] for k, v in s["meets"].items()}
    lines += ["", f"Targets met (on this machine): scoring {met['scoring']}, engine step {met['engine']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU profile: tiny model, few iterations (a logic check)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "gpu" / "out"))
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS + RAY_PARTS)
    ap.add_argument("--ray", action="store_true", help="add the Ray parts (needs Ray: run.sh --ray installs it)")
    ap.add_argument("--part-timeout", type=float, default=0, help="seconds per part (default: the profile's)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for all parts (default: the profile's)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.part:  # a child: one part, its result as JSON
        result = run_part(a.part, PROFILES[a.profile])
        Path(a.result).write_text(json.dumps(result, indent=2))
        return 0
    profile = "cpu" if a.cpu else "gpu"
    p = PROFILES[profile]
    budget = a.budget or p.budget_s
    t0 = time.perf_counter()
    parts = {}
    for name in [*a.parts, *(x for x in RAY_PARTS if a.ray and x not in a.parts)]:
        left = budget - (time.perf_counter() - t0)
        if left < 10:
            parts[name] = {"status": "skipped (budget spent)", "wall_s": 0.0}
            continue
        limit = a.part_timeout or (p.ray_part_timeout_s if name in RAY_PARTS else p.part_timeout_s)
        parts[name] = spawn(name, profile, p, min(limit, left))
        print(f"{name}: {parts[name]['status']} in {parts[name]['wall_s']:.1f} s", flush=True)
    env = next((v["env"] for v in parts.values() if "env" in v), {"python": platform.python_version()})
    report = {"kit": "bench/gpu/kit.py", "profile": profile, "command": " ".join(["python bench/gpu/kit.py",
              *sys.argv[1:]]), "wall_s": time.perf_counter() - t0, "settings": asdict(p), "env": env,
              "parts": parts}
    report["summary"] = summarize(parts)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kit.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_kit.md").write_text(markdown(report))
    print((out / "gpu_kit.md").read_text())
    return 0 if all(v["status"] == "ok" for v in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
