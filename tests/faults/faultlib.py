"""Helpers of the fault tests: configs on the shared prepared data, table ids, this session's Ray actors, a recording
Scorer (which process held which batch), and a watcher thread that kills a process at the right moment."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from loft_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
# The prepared dataset is shared by every fault test, so each data.* key here is part of every test's config.
DATA_OVERRIDES = ["data.rows_per_shard=64"]  # several shards per split: several blocks, several scoring chunks


def fault_config(tmp_path: Path, prepared_root: str, name: str, *overrides: str):
    """The tiny config on the shared prepared dataset (its `prepare` phase finds the data complete)."""
    return load_config(TINY, [f"run.storage_path={tmp_path}", f"run.name={name}", f"data.root={prepared_root}",
                              *DATA_OVERRIDES, *overrides])


def ids_of(paths) -> list[int]:
    paths = sorted(str(p) for p in paths)
    return pq.read_table(paths, columns=["id"]).column("id").to_pylist() if paths else []


def split_ids(root: str, split: str) -> list[int]:
    return sorted(ids_of(Path(root, split).glob("*.parquet")))


def table_ids(table: Path) -> list[int]:
    """Ids of a committed table, in file order (duplicates kept, so a test can see them)."""
    assert (table / "_SUCCESS").is_file(), f"{table} is not committed"
    return ids_of(table.glob("*.parquet"))


def completed(run_dir: Path) -> list[str]:
    try:
        return json.loads((run_dir / "state.json").read_text())["completed"]
    except FileNotFoundError:  # not written yet
        return []


def session_actors(class_part: str, state: str | None = "ALIVE") -> list[dict]:
    """Actors of this session's Ray whose class name contains `class_part`: its GCS actor table (id, pid, state).

    Not `ray.util.state.list_actors`: that needs a dashboard, which the session Ray runs without, and without an
    address it refuses to choose among the Ray instances of a shared machine."""
    import ray

    return [a for a in ray._private.state.actors().values()
            if class_part in a["ActorClassName"] and (state is None or a["State"] == state)]


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


class ScorerTrace:
    """What `traced_scorer` recorded: one dict per `Scorer.__call__` (pid, n, modes: its rows', ids, started_at, done_at)."""

    def __init__(self, directory: Path):
        self.dir = directory

    def batches(self) -> list[dict]:
        out = {}
        for f in sorted(self.dir.glob("*.started")):
            b = json.loads(f.read_text())
            done = f.with_suffix(".done")
            b["done_at"] = json.loads(done.read_text())["t"] if done.is_file() else None
            out[f.stem] = {**b, "started_at": b.pop("t")}
        return sorted(out.values(), key=lambda b: b["started_at"])

    def release(self) -> None:
        """Let the held batches go on (they wait while trace_dir/hold exists)."""
        (self.dir / "hold").unlink(missing_ok=True)


@contextlib.contextmanager
def traced_scorer(trace_dir: Path, hold: bool = False):
    """Run the scoring job with a recording subclass of `Scorer` in its actors (test-only; production is unchanged).

    Each batch writes `<pid>-<n>.started` (its ids, the actor's pid, its rows' scorer modes) before scoring and
    `<pid>-<n>.done` after, so a test can tell which process held which rows and which batches ran again. With
    `hold`, every batch waits while trace_dir/hold exists (120 s at most), until `ScorerTrace.release()`: a test can
    then kill an actor that provably holds a batch, or wait until two actors hold one each.

    The class is defined here, in a function, so that cloudpickle ships it to the actors by value (a worker
    cannot import the test modules); it replaces `loft_dist.scoring.scorer.Scorer`, which the scoring job looks up when
    it hands it to Ray Data.
    An environment variable read by `Scorer` would not reach the actors: they inherit the environment of the
    session's Ray, started once before the test."""
    from loft_dist.scoring import scorer

    base = scorer.Scorer
    directory = str(trace_dir)

    class TracingScorer(base):
        def __call__(self, batch: dict):
            self._traced = getattr(self, "_traced", 0) + 1
            name = os.path.join(directory, f"{os.getpid()}-{self._traced:05d}")

            def mark(event: str, record: dict) -> None:
                with open(f"{name}.{event}.tmp", "w") as f:
                    json.dump(record, f)
                os.replace(f"{name}.{event}.tmp", f"{name}.{event}")  # whole files only: the test reads them live

            modes = sorted({m for t in set(batch["targets"]) for _, m in json.loads(str(t))}) \
                if "targets" in batch else [self.mode]
            mark("started", {"pid": os.getpid(), "n": self._traced, "modes": modes, "t": time.time(),
                             "ids": [int(i) for i in batch["id"]]})
            while True:  # the hold: at most 120 s after it was set, in all (not per batch)
                try:
                    if time.time() > os.path.getmtime(os.path.join(directory, "hold")) + 120:
                        break
                except FileNotFoundError:  # released
                    break
                time.sleep(0.02)
            out = super().__call__(batch)
            mark("done", {"t": time.time()})
            return out

    trace_dir.mkdir(parents=True, exist_ok=True)
    if hold:
        (trace_dir / "hold").touch()
    scorer.Scorer = TracingScorer
    try:
        yield ScorerTrace(trace_dir)
    finally:
        scorer.Scorer = base
        (trace_dir / "hold").unlink(missing_ok=True)


class Watcher(threading.Thread):
    """Calls `step()` every `interval` s until it returns True (its work done) or `stop()`; errors are re-raised
    by `result()`, so a broken watcher fails the test instead of silently killing nothing."""

    def __init__(self, step: Callable[[], bool], interval: float = 0.1):
        super().__init__(daemon=True)
        self.step, self.interval = step, interval
        self._stop_event = threading.Event()
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if self.step():
                    self.done = True
                    return
                time.sleep(self.interval)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def result(self) -> bool:
        self.stop()
        if self.error is not None:
            raise self.error
        return self.done
