"""Where files live: a local path or an object-store URI (`s3://`, `gs://`, `file://`), behind one small API on
pyarrow.fs, and the one commit every table, checkpoint and split goes through.

Credentials come from each store's standard chain only (for S3: the AWS_* environment, the shared config and
credentials files, the instance or pod role). `run.s3_endpoint` (an S3-compatible store: MinIO, Ceph, a test server)
is exported as AWS_ENDPOINT_URL_S3, which pyarrow, boto3 and Ray's own S3 client all read.

The commit: writers put a directory's files under a staging location (a temporary prefix), then `commit` moves it
into place and writes `_SUCCESS` last, with the list of files and the row count. On a local disk the move is one
atomic rename; on an object store, where nothing renames atomically, the files are copied one by one and the
marker, one PUT, is what makes the directory count. Readers trust only committed directories and read the files
the marker names, so the leftovers of a killed attempt are never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from loft_dist.errors import ConfigError, StorageError

SUCCESS = "_SUCCESS"
ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it); a plain path is local and made absolute."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as e:  # ArrowInvalid / OSError: an unknown scheme, a URI without a bucket
        raise ConfigError(f"{location!r} is not a storage location loft_dist can open ({e}); use a local path or "
                          f"a URI such as s3://bucket/prefix, gs://bucket/prefix or file:///abs/path") from e


def is_local(location: str) -> bool:
    return isinstance(resolve(location)[0], pafs.LocalFileSystem)


def absolute(location: str) -> str:
    """A location every process can use as it is: local paths made absolute (workers run in other dirs)."""
    return str(location) if is_uri(location) else os.path.abspath(str(location))


def join(location: str, *parts: str) -> str:
    """A child of a location, spelt like it (path or URI)."""
    base = str(location).rstrip("/") if is_uri(location) else str(location)
    return "/".join([base, *parts]) if is_uri(location) else str(Path(base, *parts))


def name(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0]


def _type(location: str) -> pafs.FileType:
    fs, p = resolve(location)
    try:
        return fs.get_file_info(p).type
    except OSError as e:
        raise _storage_error(location, "read", e) from e


def is_file(location: str) -> bool:
    return _type(location) == pafs.FileType.File


def is_dir(location: str) -> bool:
    return _type(location) == pafs.FileType.Directory


def exists(location: str) -> bool:
    return _type(location) != pafs.FileType.NotFound


def listdir(location: str) -> list[str]:
    """Names directly under a directory (files and subdirectories), sorted; [] when it does not exist."""
    fs, p = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def read_bytes(location: str) -> bytes:
    fs, p = resolve(location)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{location} not found") from e
    except OSError as e:
        raise _storage_error(location, "read", e) from e


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def read_json(location: str):
    return json.loads(read_text(location))


def read_lines(location: str) -> list[str]:
    """The non-blank lines of a text file, stripped (a list of class names, one per line)."""
    return [line.strip() for line in read_text(location).splitlines() if line.strip()]


def write_bytes(location: str, data: bytes) -> None:
    """Whole or not at all: temp file + rename locally, one PUT (atomic by itself) on an object store."""
    fs, p = resolve(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            path = Path(p)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as e:
        raise _storage_error(location, "write", e) from e


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: str, obj) -> None:
    write_text(location, json.dumps(obj, indent=2, allow_nan=False))


def open_output(location: str):
    """A writable stream at `location` (parent directories made locally; object stores have none)."""
    fs, p = resolve(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        return fs.open_output_stream(p)
    except OSError as e:
        raise _storage_error(location, "write", e) from e


def open_input(location: str):
    """A random-access file at `location` (what pyarrow.parquet.ParquetFile reads)."""
    fs, p = resolve(location)
    try:
        return fs.open_input_file(p)
    except FileNotFoundError as e:
        raise StorageError(f"{location} not found") from e
    except OSError as e:
        raise _storage_error(location, "read", e) from e


def makedirs(location: str) -> None:
    fs, p = resolve(location)
    try:
        fs.create_dir(p, recursive=True)
    except OSError as e:
        raise _storage_error(location, "write", e) from e


def remove(location: str) -> None:
    """A file or a directory tree; nothing to do when it is not there."""
    fs, p = resolve(location)
    kind = _type(location)
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def move(src: str, dst: str) -> None:
    """One file, within one store (a rename locally, copy + delete on an object store)."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(d).parent.mkdir(parents=True, exist_ok=True)
        fs.move(s, d)
    except OSError as e:
        raise _storage_error(dst, "write", e) from e


def staging(final: str) -> str:
    """A fresh staging location beside `final`, for `commit`."""
    return join(parent(final), f".{name(final)}.tmp-{uuid.uuid4().hex[:8]}")


def remove_stale_staging(final: str) -> None:
    """The staging locations a killed writer of `final` left behind."""
    for entry in listdir(parent(final)):
        if entry.startswith(f".{name(final)}.tmp-"):
            remove(join(parent(final), entry))


def commit(staged: str, final: str, marker: dict | None = None) -> dict:
    """Move a fully written directory into place and write `_SUCCESS` in it last: {"files": [...], **marker}.

    Whatever `final` held before (a half-written earlier attempt, or an older version) is replaced."""
    fs, src = resolve(staged)
    _, dst = resolve(final)
    files = sorted(i.path[len(src) + 1:] for i in fs.get_file_info(pafs.FileSelector(src, recursive=True))
                   if i.type == pafs.FileType.File)
    record = {"files": files, **(marker or {})}
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            old = None
            if os.path.exists(dst):  # two renames: `final` is missing for an instant, never half there
                old = f"{os.path.dirname(dst)}/.{os.path.basename(dst)}.old-{uuid.uuid4().hex[:8]}"
                os.replace(dst, old)
            os.replace(src, dst)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if fs.get_file_info(dst).type != pafs.FileType.NotFound:
                fs.delete_dir(dst)
            for f in files:
                fs.move(f"{src}/{f}", f"{dst}/{f}")
            fs.delete_dir(src)
    except OSError as e:
        raise _storage_error(final, "write", e) from e
    write_json(join(final, SUCCESS), record)
    return record


def is_committed(location: str) -> bool:
    return is_file(join(location, SUCCESS))


def committed(location: str) -> dict:
    """The `_SUCCESS` record of a committed directory; a StorageError when it was never committed."""
    marker = join(location, SUCCESS)
    if not is_file(marker):
        raise StorageError(f"{location} has no {SUCCESS}: it is not a complete table (a reader trusts only those)")
    record = read_json(marker)
    if "files" not in record:  # committed before markers listed their files: every Parquet file in it
        record["files"] = [n for n in listdir(location) if n.endswith(".parquet")]
    return record


def committed_files(location: str, suffix: str = ".parquet") -> list[str]:
    """The files a committed directory's marker names (never a leftover beside them), as locations."""
    return [join(location, f) for f in committed(location)["files"] if f.endswith(suffix)]


def upload_dir(local_dir: str | Path, location: str) -> None:
    """Copy a local directory tree to a location (local or remote), file by file."""
    fs, dst = resolve(location)
    local_dir = Path(local_dir)
    try:
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = f.relative_to(local_dir).as_posix()
            if isinstance(fs, pafs.LocalFileSystem):
                Path(dst, rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, Path(dst, rel))
            else:
                pafs.copy_files(str(f), f"{dst}/{rel}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise _storage_error(location, "write", e) from e


@contextlib.contextmanager
def local_dir(location: str) -> Iterator[Path]:
    """A directory as a local path: itself when local, else a temporary download of it (for libraries that only
    open local files: safetensors, DeepSpeed, open_clip)."""
    fs, src = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(src)
        return
    with tempfile.TemporaryDirectory(prefix="loft_dist-") as tmp:
        try:
            pafs.copy_files(src, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as e:
            raise _storage_error(location, "read", e) from e
        yield Path(tmp)


def check_writable(location: str, key: str) -> None:
    """Create `location` if needed and write (then delete) a file beside it: an unwritable directory, a missing
    bucket, no credentials or a read-only bucket fail here, in one line naming the config key, before any work
    starts. Beside, not in it: a refused second driver must not touch what the first is writing (on S3, deleting a
    directory's last file makes pyarrow write a marker for the directory)."""
    fs, p = resolve(location)
    inside = "/" not in p.strip("/")  # a bucket itself: nothing beside it
    probe = join(location if inside else parent(location),
                 f".{'' if inside else name(location) + '.'}loft-dist-write-check-{uuid.uuid4().hex[:8]}")
    fs, p = resolve(probe)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            Path(resolve(location)[1]).mkdir(parents=True, exist_ok=True)
            Path(p).write_bytes(b"")
            Path(p).unlink()
        except OSError as e:
            raise ConfigError(f"{key}={location}: cannot create or write a directory there ({e.strerror or e}); "
                              f"set {key} to a writable directory (on a cluster: the shared volume every node "
                              f"mounts)") from e
        return
    try:
        with fs.open_output_stream(p) as f:
            f.write(b"")
        fs.delete_file(p)
    except OSError as e:
        raise _storage_error(location, "write", e, key) from e


def _storage_error(location: str, action: str, e: BaseException, key: str = "") -> StorageError:
    """An OSError of a store as one actionable line: what failed where, and the usual causes."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"{key}={location}" if key else str(location)
    if is_uri(location):
        hint = ("check that the bucket exists, that this process has credentials for it (AWS_ACCESS_KEY_ID / "
                "AWS_PROFILE / an instance role for s3://) allowing it to " + action +
                (", and run.s3_endpoint for an S3-compatible server" if str(location).startswith("s3://") else ""))
    else:
        hint = f"check that the directory exists or can be created and that this user may {action} it"
    return StorageError(f"cannot {action} {where}: {text}; {hint}")


class RunLayout:
    """Every location of a run, named once: the driver, scoring, training, evaluation, the report and export all
    take their paths from here. `root` is the run dir: a local path (made absolute) or an object-store URI."""

    CONFIG, STATE, LEASE = "config.yaml", "state.json", "lease.json"

    def __init__(self, root: str):
        self.root = absolute(str(root))

    def __repr__(self) -> str:
        return f"RunLayout({self.root!r})"

    def file(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def name(self) -> str:
        return name(self.root)

    config = property(lambda self: self.file(self.CONFIG))
    state = property(lambda self: self.file(self.STATE))
    lease = property(lambda self: self.file(self.LEASE))
    data = property(lambda self: self.file("data"))  # the dataset when data.root is ""
    quarantine = property(lambda self: self.file("quarantine"))
    report = property(lambda self: self.file("report"))
    ray_train = property(lambda self: self.file("ray_train"))  # Ray Train's storage_path

    def round_dir(self, r: int) -> str:
        return self.file("rounds", f"r{r}")

    def rounds(self) -> list[int]:
        """The round numbers with a directory, in order."""
        names = listdir(self.file("rounds"))
        return sorted(int(n[1:]) for n in names if n.startswith("r") and n[1:].isdigit())

    def pseudo_labels(self, r: int) -> str:
        return join(self.round_dir(r), "pseudo_labels")

    def predictions(self, r: int, split: str) -> str:
        return join(self.round_dir(r), "predictions", split)

    def checkpoint(self, r: int) -> str:
        return join(self.round_dir(r), "checkpoint")

    def metrics(self, r: int) -> str:
        return join(self.round_dir(r), "metrics.json")

    def train_metrics(self, r: int) -> str:
        return join(self.round_dir(r), "train_metrics.json")
