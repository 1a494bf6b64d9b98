"""What every benchmark shares: a generated image pool, versions and machine, and the BENCHMARKS.md writer."""

from __future__ import annotations

import io
import os
import platform
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DISTINCT = 4096  # distinct generated images, cycled: decode work per row is the same, generation stays fast


def generated_pngs(size: int, seed: int = 0, distinct: int = DISTINCT) -> list[bytes]:
    """Smooth colour gradients plus noise: PNGs of ~1–3 kB at 32 px, like CIFAR's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(distinct):
        a, b, c = rng.uniform(0, 1, (3, 3))
        img = (a[:, None, None] * xx + b[:, None, None] * yy + c[:, None, None]) * 127
        img = img.transpose(1, 2, 0) + rng.normal(0, 12, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_pool(root: Path, n: int, shards: int, size: int = 32) -> list[str]:
    """n generated rows as `shards` Parquet image shards (the store's schema); returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loft_dist.data.store import IMAGE_SCHEMA

    pngs = generated_pngs(size)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, part in enumerate(np.array_split(np.arange(n), shards)):
        table = pa.table({"id": part.astype(np.int64), "image": [pngs[i % len(pngs)] for i in part],
                          "label": np.full(len(part), -1, np.int32), "true_label": np.full(len(part), -1, np.int32),
                          "source": ["generated"] * len(part)}, schema=IMAGE_SCHEMA)
        path = root / f"part-{s:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        paths.append(str(path))
    return paths


def rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def versions() -> str:
    import deepspeed
    import open_clip
    import peft
    import pyarrow
    import ray
    import torch

    return (f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
            f"deepspeed {deepspeed.__version__}, open_clip {open_clip.__version__}, peft {peft.__version__}, "
            f"pyarrow {pyarrow.__version__}")


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    except Exception:  # noqa: BLE001 - the description is best effort
        pass
    import psutil

    return f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU ({platform.machine()})"


def append_section(title: str, command: str, body: str) -> None:
    """Append one result section to BENCHMARKS.md with the command, versions and machine."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    text = text.rstrip("\n") + f"\n\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \nVersions: {versions()}\n\n{body.strip()}\n"
    path.write_text(text)
