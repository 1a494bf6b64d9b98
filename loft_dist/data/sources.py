"""Readers of the image sources users have: CIFAR pickles, ImageFolder trees, manifests.

Every reader returns a `Source`: class names, int64 labels, and per-image access to the
ENCODED bytes (`encoded(i)`) plus a human-readable `origin(i)`. Nothing is decoded or
re-encoded up front, so a builder can stream a source into Parquet shards one image at a
time; file-backed sources read each file (or Parquet row group) only when asked.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from loft_dist.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class SourceError(DataError):
    """A source is missing, malformed or inconsistent; the message says where and how to fix.

    A DataError (hence a ValueError): the CLI reports it as one line.
    """


@dataclass
class Source:
    """Images of one split: `encoded(i)` gives PNG/JPEG/... bytes, `origin(i)` says where from."""

    class_names: list[str]
    labels: np.ndarray  # int64 (N,), index into class_names
    encoded: Callable[[int], bytes]
    origin: Callable[[int], str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)


# The callables below are module-level functions bound with functools.partial (not
# closures) so a Source pickles with the standard library, e.g. across process pools.


def _check_index(i: int, n: int) -> int:
    # Negative indices would silently wrap around and hand back the wrong image.
    i = int(i)
    if not 0 <= i < n:
        raise IndexError(f"image index {i} out of range for a source of {n} images")
    return i


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles

_CIFAR_LAYOUT = {
    # variant: (directory, {split: files}, meta file, label key, names key)
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]},
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}


def _allowed_pickle_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2 moved the module; old pickles still name numpy.core.
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    # A pickle can call any importable function while loading; CIFAR files only need
    # numpy's array reconstruction, so anything else means a corrupt or hostile file.
    def __init__(self, file, path: Path):
        # latin1 is numpy's documented way to read Python 2 array pickles.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"{self._path}: refused to unpickle global '{module}.{name}'; a CIFAR "
                f"python pickle only needs numpy array globals, so this file is not a CIFAR "
                f"batch or has been tampered with. Re-download it from {_CIFAR_URL}."
            ) from None


def _load_cifar_pickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise SourceError(
            f"missing CIFAR file {path}; download the python version from {_CIFAR_URL} "
            f"and extract it so this file exists."
        )
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except _RefusedGlobal:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise SourceError(
            f"{path}: cannot read as a CIFAR python pickle ({type(e).__name__}: {e}); "
            f"the file is truncated or corrupt, re-download it from {_CIFAR_URL}."
        ) from e
    if not isinstance(obj, dict):
        raise SourceError(
            f"{path}: expected a dict in a CIFAR python pickle, got {type(obj).__name__}."
        )
    # Python 2 files read with encoding="latin1" give str keys; files written by Python 3
    # (or read with encoding="bytes") give bytes keys.
    return {_as_str(k): v for k, v in obj.items()}


def _as_str(x) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def _require_key(d: dict, key: str, path: Path):
    if key not in d:
        raise SourceError(
            f"{path}: key '{key}' not found (keys: {sorted(d)}); this is not the expected "
            f"CIFAR file, check the variant argument and re-download from {_CIFAR_URL}."
        )
    return d[key]


def _resolve_cifar_dir(root: Path, dirname: str, first_file: str) -> Path:
    for candidate in (root / dirname, root):
        if (candidate / first_file).is_file():
            return candidate
    raise SourceError(
        f"CIFAR files not found: expected {root / dirname / first_file} (or {root / first_file} "
        f"when root is the '{dirname}' directory itself); download the python version from "
        f"{_CIFAR_URL}, extract it, and pass the directory containing '{dirname}' or that "
        f"directory itself as root."
    )


def _encode_cifar_png(data: np.ndarray, i: int) -> bytes:
    from PIL import Image

    i = _check_index(i, len(data))
    # Rows are channel-major: 1024 red, then 1024 green, then 1024 blue values.
    hwc = np.ascontiguousarray(data[i].reshape(3, 32, 32).transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    return buf.getvalue()


def _cifar_origin(variant: str, files: tuple[str, ...], starts: np.ndarray, i: int) -> str:
    i = _check_index(i, int(starts[-1]))
    b = int(np.searchsorted(starts, i, side="right")) - 1
    return f"{variant}:{files[b]}:{i - int(starts[b])}"


def _check_label_range(labels: np.ndarray, num_classes: int, message) -> None:
    """A SourceError at the first label outside 0..num_classes-1; message(index, how many) says where and the fix."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise SourceError(message(int(bad[0]), len(bad)))


def read_cifar(root: str | os.PathLike, split: str = "train", variant: str = "cifar10") -> Source:
    """Read CIFAR-10 or CIFAR-100 (fine labels) from the official python pickles.

    `root` is the directory holding `cifar-10-batches-py` / `cifar-100-python`, or that
    directory itself. Images come out as PNG bytes, encoded on demand.
    """
    if variant not in _CIFAR_LAYOUT:
        raise SourceError(f"unknown CIFAR variant '{variant}'; use one of {sorted(_CIFAR_LAYOUT)}.")
    dirname, split_files, meta_file, label_key, names_key = _CIFAR_LAYOUT[variant]
    if split not in split_files:
        raise SourceError(f"unknown CIFAR split '{split}'; use one of {sorted(split_files)}.")
    files = split_files[split]
    base = _resolve_cifar_dir(Path(root), dirname, meta_file)

    meta_path = base / meta_file
    class_names = [_as_str(n) for n in _require_key(_load_cifar_pickle(meta_path), names_key, meta_path)]

    datas, labels = [], []
    for name in files:
        path = base / name
        batch = _load_cifar_pickle(path)
        data = _require_key(batch, "data", path)
        lab = np.asarray(_require_key(batch, label_key, path))
        is_rows = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
        if not is_rows or data.shape[1] != 3072:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise SourceError(
                f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}; "
                f"re-download the file from {_CIFAR_URL}."
            )
        if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
            raise SourceError(
                f"{path}: '{label_key}' must be {len(data)} integers (one per image), got "
                f"{lab.dtype} {lab.shape}; re-download the file from {_CIFAR_URL}."
            )
        _check_label_range(lab, len(class_names), lambda i, n: (
            f"{path}: record {i} has label {lab[i]}, outside the range 0..{len(class_names) - 1} of the "
            f"{len(class_names)} names in {meta_path}; check that the meta file belongs to the same dataset."))
        datas.append(data)
        labels.append(lab.astype(np.int64))

    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    starts = np.cumsum([0] + [len(d) for d in datas])
    return Source(
        class_names=class_names,
        labels=np.concatenate(labels),
        encoded=functools.partial(_encode_cifar_png, data),
        origin=functools.partial(_cifar_origin, variant, tuple(files), starts),
    )


# ---------------------------------------------------------------------------------------
# root/<class>/<image> trees


def _read_file_bytes(paths: list[str], i: int) -> bytes:
    path = paths[_check_index(i, len(paths))]
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SourceError(
            f"image file {path} no longer exists; it was listed when the source was read."
        ) from None


def _list_item(items: list[str], i: int) -> str:
    return items[_check_index(i, len(items))]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_image_folder(root: str | os.PathLike) -> Source:
    """Read a `root/<class>/<image>` tree (torchvision ImageFolder layout).

    Classes are the sub-directories sorted by name; images are found recursively inside each
    and returned as their original file bytes. Hidden entries (".name") are skipped, and so are files
    beside the class directories; any other file in a class directory that is not an image is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a directory.")
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        raise SourceError(
            f"image folder {root} has no class sub-directories; lay it out as "
            f"{root}/<class name>/<image file> with one directory per class."
        )

    paths: list[str] = []
    labels: list[int] = []
    others: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found, other = _find_images(class_dir)
        if not found:
            raise SourceError(
                f"class directory {class_dir} holds no images (extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the directory."
            )
        paths.extend(found)
        labels.extend([label] * len(found))
        others.extend(other)
    if others:
        raise SourceError(not_images_message(others))

    return Source(
        class_names=[d.name for d in class_dirs],
        labels=np.asarray(labels, dtype=np.int64),
        encoded=functools.partial(_read_file_bytes, paths),
        origin=functools.partial(_list_item, paths),
    )


def _find_images(directory: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under `directory`; hidden entries (".name") are neither."""
    # Sorted at every level and never following hidden entries, so the order (and the ids built
    # from it) is the same on every machine.
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                (found if _is_image(f) else others).append(os.path.join(dirpath, f))
    return found, others


def not_images_message(others: list) -> str:
    """An image folder's files that are not images would be left out unseen (neither read nor quarantined): say
    which, and how to fix. Files with an image extension that do not decode are quarantined instead."""
    more = f" (and {len(others) - 1} more such files)" if len(others) > 1 else ""
    return (f"{others[0]} is not an image file{more}: only {', '.join(IMAGE_EXTENSIONS)} files are read, and "
            f"nothing in an image folder is left out silently; move it out of the folder (or hide it: names "
            f"starting with '.' are skipped), or convert it to one of those formats.")


def read_image_files(root: str | os.PathLike) -> Source:
    """Every image under `root`, recursively, without classes (labels -1): an out-of-distribution pool
    such as COCO's flat train2017/ directory, or an ImageFolder tree whose classes do not matter. Hidden entries
    (".name") are skipped; any other file that is not an image is an error."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image directory {root} does not exist or is not a directory.")
    paths, others = _find_images(root)
    if not paths:
        raise SourceError(f"image directory {root} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    if others:
        raise SourceError(not_images_message(others))
    return Source(
        class_names=[],
        labels=np.full(len(paths), -1, dtype=np.int64),
        encoded=functools.partial(_read_file_bytes, paths),
        origin=functools.partial(_list_item, paths),
    )


# ---------------------------------------------------------------------------------------
# CSV / Parquet manifests


class _ParquetImageColumn:
    """Reads one binary column of a Parquet file a row group at a time.

    Row groups stay in a least-recently-used cache of at most `cache_mb` MB: streaming the
    source in order reads each image once, and `prepare`'s shuffled order still reads each
    row group once for manifests up to the cache size (larger ones are re-read; see prepare).
    """

    def __init__(self, path: str, column: str, cache_mb: float = 512):
        import pyarrow.parquet as pq

        self.path = path
        self.column = column
        self.cache_bytes = int(cache_mb * 2**20)
        meta = pq.ParquetFile(path).metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self.__setstate__(self.__getstate__())

    def __getstate__(self):
        # An open file handle does not pickle; it is reopened on first use.
        return {"path": self.path, "column": self.column, "starts": self.starts, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state, _file=None, _groups=collections.OrderedDict(), _held=0)

    def _group(self, g: int):
        import pyarrow.parquet as pq

        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        if self._file is None:
            self._file = pq.ParquetFile(self.path)
        col = self._file.read_row_group(g, columns=[self.column]).column(0)
        self._groups[g] = col
        self._held += col.nbytes
        while self._held > self.cache_bytes and len(self._groups) > 1:
            self._held -= self._groups.popitem(last=False)[1].nbytes
        return col

    def __call__(self, i: int) -> bytes:
        i = _check_index(i, int(self.starts[-1]))
        g = int(np.searchsorted(self.starts, i, side="right")) - 1
        value = self._group(g)[i - int(self.starts[g])].as_py()
        if value is None:
            raise SourceError(
                f"{self.path}: record {i} has an empty '{self.column}'; give every row image bytes."
            )
        return value


def _manifest_row_origin(path: str, i: int) -> str:
    return f"{path}:row {i}"


def _read_manifest_table(path: Path):
    """Label and image-location columns of the manifest; image bytes are not read here."""
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if suffix == ".csv":
        import pandas as pd

        # Everything as text, so labels like "3" and "cat" are told apart by us, not by
        # pandas' type guessing, and empty cells stay "" rather than NaN.
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return list(df.columns), {c: df[c].tolist() for c in df.columns}, None
    if suffix in (".parquet", ".pq"):
        schema = pq.read_schema(path)
        return list(schema.names), None, schema
    raise SourceError(f"manifest {path}: unsupported extension '{path.suffix}'; use .csv or .parquet.")


def _row_ref(path: Path, i: int, is_csv: bool) -> str:
    # CSV users look at line numbers; the header is line 1.
    return f"{path} record {i} (line {i + 2})" if is_csv else f"{path} record {i}"


_INT_RE = re.compile(r"^[+-]?\d+$")


def _labels_from_values(
    values: list, path: Path, is_csv: bool, class_names: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip() == ""):
            raise SourceError(
                f"{_row_ref(path, i, is_csv)}: empty label; give every row a class index or class name."
            )
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) or (
        is_csv and all(_INT_RE.match(v.strip()) for v in values)
    ):
        ints = np.asarray([int(v) for v in values], dtype=np.int64)
        if class_names is None:
            # Without names the class count is the largest index seen plus one.
            class_names = [str(k) for k in range(int(ints.max()) + 1 if len(ints) else 0)]
        _check_label_range(ints, len(class_names), lambda i, n: (
            f"{_row_ref(path, i, is_csv)}: label {ints[i]} is outside the range 0..{len(class_names) - 1} of the "
            f"{len(class_names)} classes; fix the label or the class_names list ({n} rows affected)."))
        return ints, list(class_names)

    if not all(isinstance(v, str) for v in values):
        i = next(i for i, v in enumerate(values) if not isinstance(v, str))
        raise SourceError(
            f"{_row_ref(path, i, is_csv)}: label {values[i]!r} is neither an integer class index "
            f"nor a class name; use one kind for the whole column."
        )
    names = [v.strip() for v in values]
    if class_names is None:
        class_names = sorted(set(names))
    index = {n: k for k, n in enumerate(class_names)}
    for i, n in enumerate(names):
        if n not in index:
            known = ", ".join(repr(c) for c in list(class_names)[:5])
            more = f", ... ({len(class_names)} in all)" if len(class_names) > 5 else ""
            raise SourceError(
                f"{_row_ref(path, i, is_csv)}: unknown class name {n!r}; known names: {known}{more}. "
                f"Fix the label or add the name to class_names."
            )
    return np.asarray([index[n] for n in names], dtype=np.int64), list(class_names)


def _resolve_image_paths(values: list, path: Path, column: str, is_csv: bool) -> list[str]:
    base = path.parent
    resolved = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip() == ""):
            raise SourceError(f"{_row_ref(path, i, is_csv)}: empty '{column}'; give every row an image path.")
        p = Path(v.strip())
        resolved.append(str(p if p.is_absolute() else base / p))
    for i, p in enumerate(resolved):
        # One stat per image now is cheaper than a failure hours into a shard build.
        if not os.path.isfile(p):
            raise SourceError(
                f"{_row_ref(path, i, is_csv)}: image file {p} not found (relative paths are "
                f"resolved against {base}); fix the path or remove the row."
            )
    return resolved


def read_manifest(path: str | os.PathLike, class_names: list[str] | None = None, labeled: bool = True) -> Source:
    """Read a CSV or Parquet table of images with columns `path,label` or `image,label`.

    `path` (or `image` in CSV, or a string `image` in Parquet) is a file path, relative paths
    resolved against the manifest's directory; a binary `image` column in Parquet holds the
    encoded bytes. `label` is an int class index or a class name; names are mapped through
    `class_names`, or through the sorted unique names when `class_names` is None.
    With `labeled=False` (an out-of-distribution pool) `label` is not needed and every label is -1.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"manifest {path} does not exist.")
    columns, csv_values, schema = _read_manifest_table(path)
    is_csv = csv_values is not None

    image_col = "image" if "image" in columns else "path" if "path" in columns else None
    if image_col is None or (labeled and "label" not in columns):
        needed = "'path,label' or 'image,label'" if labeled else "'path' or 'image'"
        raise SourceError(
            f"manifest {path}: needs columns {needed}, found columns {columns}; rename the columns accordingly."
        )

    if is_csv:
        label_values, image_values, image_bytes = csv_values.get("label"), csv_values[image_col], False
        num_rows = len(image_values)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        image_type = schema.field(image_col).type
        image_bytes = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
        if not image_bytes and not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
            raise SourceError(
                f"manifest {path}: column '{image_col}' has type {image_type}; use binary "
                f"(encoded image bytes) or string (file paths)."
            )
        read_cols = (["label"] if labeled else []) + ([] if image_bytes else [image_col])
        table = pq.read_table(path, columns=read_cols)
        num_rows = pq.ParquetFile(path).metadata.num_rows
        label_values = table.column("label").to_pylist() if labeled else None
        image_values = None if image_bytes else table.column(image_col).to_pylist()

    if labeled:
        labels, class_names = _labels_from_values(label_values, path, is_csv, class_names)
    else:
        labels, class_names = np.full(num_rows, -1, dtype=np.int64), []

    if image_bytes:
        encoded = _ParquetImageColumn(str(path), image_col)
        origin = functools.partial(_manifest_row_origin, str(path))
    else:
        paths = _resolve_image_paths(image_values, path, image_col, is_csv)
        encoded = functools.partial(_read_file_bytes, paths)
        origin = functools.partial(_list_item, paths)
    return Source(class_names=class_names, labels=labels, encoded=encoded, origin=origin)
