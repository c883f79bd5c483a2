"""Text domains: the user's documents, tokenised and packed into fixed-length blocks for language modelling.

A text domain's ``source`` names where its documents are (``SourceSpec``):

- ``csv``, ``jsonl``, ``parquet``: a file (or a folder of such files), one document per row, its text in
  ``text_columns`` (several columns are joined with a newline); ``where`` keeps the rows whose column holds one of
  the given values, which is how one table is cut into domains (AG News' class column: one domain per topic);
- ``text_files``: a ``.txt`` file, or a folder of them (searched recursively), one document per file; one domain per
  file or per folder.

Documents are divided into train, val and test by a seeded permutation of the documents (``test_fraction``,
``val_fraction``), unless the user has a test file of their own (``test_path``): a document never straddles two
splits. Each split's documents are tokenised (``tokenizer: bytes``, the UTF-8 bytes, so nothing is downloaded; or a
local ``tokenizer.json`` of the Hugging Face ``tokenizers`` library), each followed by the end-of-document id, laid
end to end and cut into blocks of ``context + 1`` ids (the remainder is dropped). The shards and manifest are
written as for any domain (``orchestrator/shards.py``), with ``schema.text`` (see ``orchestrator/manifest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from orchestrator.errors import ShardError
from orchestrator.shards import RawSplit, hold_out, name_seed, resolve_source_dir
from orchestrator.tables import column, matches, read_table, read_utf8, source_files

if TYPE_CHECKING:
    from orchestrator.spec import SourceSpec

__all__ = ["BYTE_VOCAB", "Tokenizer", "load_tokenizer", "pack", "read_documents", "text_splits"]

BYTE_VOCAB = 257  # the 256 byte values and the end-of-document id 256


@dataclass(frozen=True)
class Tokenizer:
    """Text to token ids: ``encode(text) -> [n]`` ids in ``0 .. vocab_size - 1``; ``eos`` ends each document.

    Attributes:
        name: ``bytes`` or the tokenizer file's path. vocab_size: ids, ``eos`` included. eos: end-of-document id.
    """

    name: str
    vocab_size: int
    eos: int
    impl: Any = None

    def encode(self, text: str) -> np.ndarray:
        """Token ids ``[n]`` (int64) of ``text``."""
        if self.impl is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.asarray(self.impl.encode(text).ids, dtype=np.int64)

    @property
    def dtype(self) -> str:
        """The narrowest shard dtype that holds every id: uint16 or int32."""
        return "uint16" if self.vocab_size <= 2**16 else "int32"


def load_tokenizer(name: str, data_root: Path | None) -> Tokenizer:
    """``bytes``, or a Hugging Face ``tokenizers`` file (``tokenizer.json``, or a folder holding one) by local path
    (relative paths under the data root). Its end-of-document id is its ``<|endoftext|>``, ``</s>`` or ``[SEP]``
    token, else a new id after its vocabulary.

    Raises:
        ShardError: a missing file, one ``tokenizers`` cannot read, or ``tokenizers`` not installed.
    """
    if name == "bytes":
        return Tokenizer("bytes", BYTE_VOCAB, 256)
    path = Path(name)
    if not path.is_absolute() and data_root is not None:
        path = data_root / path
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ShardError(f"source.tokenizer {name}: reading a tokenizer file needs the tokenizers library "
                         f"(pip install tokenizers), or use tokenizer: bytes") from None
    try:
        impl = HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
        raise ShardError(f"source.tokenizer: cannot read tokenizer file {path}: {str(e).splitlines()[0]}") from None
    vocab = impl.get_vocab_size(with_added_tokens=True)
    eos = next((impl.token_to_id(t) for t in ("<|endoftext|>", "</s>", "[SEP]") if impl.token_to_id(t) is not None),
               None)
    return Tokenizer(str(path), vocab if eos is not None else vocab + 1, eos if eos is not None else vocab, impl)


def read_documents(source: SourceSpec, path: Path) -> list[str]:
    """The documents of a source path (a file or a folder), in file and row order, after ``where``.

    Raises:
        ShardError: a missing path, a missing column, a text column that is not text, a file that is not UTF-8
            (with its byte offset), each naming the file.
    """
    files = source_files(path, source.kind)
    if source.kind == "text_files":
        return [read_utf8(f) for f in files]
    docs: list[str] = []
    for f in files:
        table = read_table(f, source.kind, source.columns)
        keep = matches(table, f, source.where or {})
        parts = []
        for name in source.text_columns or []:
            values = column(table, f, name, "text")
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                raise ShardError(f"{f}: text column '{name}' holds {values.type}, not text")
            parts.append(values.to_pylist())
        docs += ["\n".join(p for p in row if p) for row, k in zip(zip(*parts), keep) if k]
    return docs


def pack(docs: list[str], tokenizer: Tokenizer, context: int) -> np.ndarray:
    """Token blocks ``[N, context + 1]`` (the tokenizer's dtype): every document's ids followed by ``eos``, laid end
    to end and cut into blocks; the ids after the last whole block are dropped."""
    width = context + 1
    ids = [np.append(tokenizer.encode(d), tokenizer.eos) for d in docs]
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    n = len(flat) // width
    return flat[: n * width].reshape(n, width).astype(tokenizer.dtype)


def text_splits(source: SourceSpec, data_root: Path | None, name: str) -> tuple[dict[str, RawSplit], dict[str, Any]]:
    """A text domain's ``train``, ``val`` and ``test`` token blocks, and its ``schema.text`` record.

    Raises:
        ShardError: unreadable input (see :func:`read_documents`), no documents, or a split too short for one block
            (naming the domain, the path and what to change).
    """
    path = resolve_source_dir(source, data_root)
    tokenizer = load_tokenizer(source.tokenizer, data_root)
    docs = read_documents(source, path)[: source.max_rows]
    where = f" where {source.where}" if source.where else ""
    if not docs:
        raise ShardError(f"domain '{name}': no documents in {path}{where}")
    if source.test_path:
        test_docs = read_documents(source, resolve_source_dir(source.model_copy(update={"path": source.test_path}),
                                                              data_root))
    else:
        kept, held = hold_out(len(docs), source.test_fraction, seed=name_seed(f"{name}/test"), at_least_one=True)
        docs, test_docs = [docs[i] for i in kept], [docs[i] for i in held]
    kept, held = hold_out(len(docs), source.val_fraction, seed=name_seed(f"{name}/val"))
    splits = {"train": [docs[i] for i in kept], "val": [docs[i] for i in held], "test": test_docs}
    out = {split: RawSplit(pack(part, tokenizer, source.context), None) for split, part in splits.items()}
    for split in ("train", "test"):
        if len(out[split].x) == 0:
            raise ShardError(f"domain '{name}': its {split} split ({len(splits[split])} documents from {path}{where}) "
                             f"is shorter than one block of {source.context + 1} tokens; lower source.context or "
                             f"add text")
    record = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name, "eos": tokenizer.eos,
              "context": source.context}
    return out, record

