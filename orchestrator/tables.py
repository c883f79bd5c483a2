"""The user's tables (CSV, JSON lines, Parquet): reading them, and classification domains from their columns.

A table source names its file (or a folder of such files) and, for classification, ``feature_columns`` (numbers, one
input feature each, kept as float32) and ``label_column`` (integers, or names: the sorted names of the whole file are
the labels 0, 1, ...). ``where`` keeps the rows whose column holds one of the given values, and ``classes`` the rows of
those labels, so one table is cut into domains either by a column's values or by a class grouping. The test split is
the user's ``test_path`` or a seeded ``test_fraction`` of the rows; val is carved from train as for every source.
Text sources read the same files (``orchestrator/text.py``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.errors import ShardError
from orchestrator.shards import RawDataset, RawSplit, hold_out, resolve_source_dir

if TYPE_CHECKING:
    from orchestrator.spec import SourceSpec

SUFFIXES = {"csv": (".csv",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "text_files": (".txt",)}


def source_files(path: Path, kind: str) -> list[Path]:
    """The files of a source path: the file itself, or the folder's files of the kind's suffixes, sorted (text
    files: searched recursively).

    Raises:
        ShardError: a missing path, or a folder without such files.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ShardError(f"source path {path} does not exist")
    pattern = "**/*" if kind == "text_files" else "*"
    files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in SUFFIXES[kind])
    if not files:
        raise ShardError(f"source path {path} holds no {' or '.join(SUFFIXES[kind])} file")
    return files


def read_utf8(path: Path) -> str:
    """The file's text.

    Raises:
        ShardError: if it is not UTF-8, naming the file and the byte offset of the first bad byte.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})") \
            from None


def read_table(path: Path, kind: str, column_names: list[str] | None) -> pa.Table:
    """One CSV, JSON-lines or Parquet file as an Arrow table (a CSV's header row names its columns, unless
    ``column_names`` does).

    Raises:
        ShardError: an unreadable file or a text file that is not UTF-8 (naming the file and byte offset).
    """
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        text = read_utf8(path).encode("utf-8")
        if kind == "jsonl":
            import pyarrow.json as pj

            return pj.read_json(io.BytesIO(text))
        import pyarrow.csv as pcsv

        return pcsv.read_csv(io.BytesIO(text), read_options=pcsv.ReadOptions(column_names=column_names),
                             parse_options=pcsv.ParseOptions(newlines_in_values=True))
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: cannot read it as {kind}: {str(e).splitlines()[0]}") from None


def column(table: pa.Table, path: Path, name: str, role: str) -> pa.ChunkedArray:
    """The column ``name`` of a file's table.

    Raises:
        ShardError: naming the file, the column's role (text, feature, label, where) and the columns it has.
    """
    if name not in table.column_names:
        raise ShardError(f"{path}: {role} column '{name}' not found (columns: {', '.join(table.column_names)})")
    return table.column(name)


def matches(table: pa.Table, path: Path, where: dict[str, Any]) -> np.ndarray:
    """Bool ``[rows]``: rows whose every ``where`` column holds one of the given values (compared as text, so that
    ``3`` matches a CSV's ``"3"``).

    Raises:
        ShardError: a ``where`` column the file does not have (naming the file and its columns).
    """
    keep = np.ones(table.num_rows, dtype=bool)
    for name, wanted in where.items():
        values = column(table, path, name, "source.where")
        allowed = pa.array([str(v) for v in (wanted if isinstance(wanted, list) else [wanted])])
        keep &= pc.is_in(pc.cast(values, pa.string()), value_set=allowed).to_numpy(zero_copy_only=False)
    return keep


def _labels(values: pa.ChunkedArray, path: Path, name: str) -> tuple[np.ndarray, list[str] | None]:
    """A label column as ``[rows]`` int64 labels, and the names when the labels are names (sorted: name i is label
    i).

    Raises:
        ShardError: empty values, or a column that mixes numbers and names (naming the file, the column and a value
            of each kind).
    """
    if values.null_count:
        raise ShardError(f"{path}: label column '{name}' has {values.null_count} empty value(s)")
    if pa.types.is_integer(values.type):
        return values.to_numpy().astype(np.int64), None
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ShardError(f"{path}: label column '{name}' holds {values.type}, not integers or class names")
    text = [str(v).strip() for v in values.to_pylist()]
    numeric = [v for v in text if v.lstrip("-").isdigit()]
    if numeric and len(numeric) != len(text):
        other = next(v for v in text if not v.lstrip("-").isdigit())
        raise ShardError(f"{path}: label column '{name}' mixes numbers and names (e.g. {numeric[0]!r} and "
                         f"{other!r}); use one kind")
    if numeric:
        return np.asarray([int(v) for v in text], dtype=np.int64), None
    names = sorted(set(text))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[v] for v in text], dtype=np.int64), names


def _features(table: pa.Table, path: Path, names: list[str]) -> np.ndarray:
    """The feature columns as ``[rows, F]`` float32.

    Raises:
        ShardError: a missing column, one that is not numeric, or one with empty values (naming file and column).
    """
    out = []
    for name in names:
        values = column(table, path, name, "feature")
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise ShardError(f"{path}: feature column '{name}' holds {values.type}, not numbers")
        if values.null_count:
            raise ShardError(f"{path}: feature column '{name}' has {values.null_count} empty value(s)")
        out.append(values.to_numpy().astype(np.float32))
    return np.stack(out, axis=1) if out else np.zeros((table.num_rows, 0), np.float32)


def _read_rows(source: SourceSpec, path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Features ``[N, F]`` float32 and labels ``[N]`` of a source path's rows after ``where``, and the label names."""
    xs, ys, names = [], [], None
    assert source.label_column is not None
    for f in source_files(path, source.kind):
        table = read_table(f, source.kind, source.columns)
        labels, these = _labels(column(table, f, source.label_column, "label"), f, source.label_column)
        if these is not None and names is not None and these != names:
            raise ShardError(f"{f}: label column '{source.label_column}' names {these}, an earlier file {names}")
        names = these if these is not None else names
        keep = matches(table, f, source.where or {})
        xs.append(_features(table, f, source.feature_columns or [])[keep])
        ys.append(labels[keep])
    return np.concatenate(xs), np.concatenate(ys), names


def load_table(source: SourceSpec, data_root: Path | None) -> RawDataset:
    """A classification table as a :class:`RawDataset` (float32 features of shape ``[F]``, scale 1): the user's
    ``test_path`` as test, else a seeded ``test_fraction`` of the rows.

    Raises:
        ShardError: unreadable files or columns (see :func:`read_table`, :func:`column`), mixed or empty labels,
            non-numeric features, or train and test files naming their classes differently.
    """
    x, y, names = _read_rows(source, resolve_source_dir(source, data_root))
    if source.test_path:
        tx, ty, test_names = _read_rows(source, resolve_source_dir(source.model_copy(update={"path": source.test_path}),
                                                                   data_root))
        if test_names != names:
            raise ShardError(f"source.test_path {source.test_path}: its classes {test_names} differ from the train "
                             f"file's {names}")
        train, test = RawSplit(x, y), RawSplit(tx, ty)
    else:
        kept, held = hold_out(len(y), source.test_fraction, seed=0, at_least_one=True)
        train, test = RawSplit(x[kept], y[kept]), RawSplit(x[held], y[held])
    return RawDataset(train, test, (x.shape[1],), 1.0, names)
