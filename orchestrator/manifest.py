"""The public format of a domain's ``manifest.json`` (``lifelong-shards/1``), as pydantic models.

A domain lives under one URI::

    <uri>/manifest.json                      this file, written last (the domain's commit record)
    <uri>/<split>/part-00000.parquet ...     the shards of each split (train, test, and optionally val)

Every shard is a Parquet file with a feature column (the flattened input, as a fixed-size binary or a list of
values) and, for classification, an integer label column. A text domain (``schema.text``, language modelling) has no
label column: each row is one block of ``context + 1`` token ids (uint8, uint16 or int32), the model reads the first
``context`` and predicts the last ``context``. ``lifelong shards build`` writes this layout; anyone may write it by
hand, and ``lifelong shards schema`` prints the JSON Schema of the manifest. Digests:

- a shard's ``sha256``: hex sha256 of the file's bytes (64 characters);
- a split's ``digest``: the first 32 hex characters of the sha256 of ``json.dumps(shards, sort_keys=True)``;
- the domain's ``digest``: the same over ``json.dumps(splits, sort_keys=True)``.

These digests are the lineage keys that MLflow records (``orchestrator/registry.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT = "lifelong-shards/1"
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class FeatureSchema(_Record):
    """The feature column: ``dtype`` its values (uint8 for images, float32 for a table's numeric columns; uint8, uint16
    or int32 token ids for text),
    ``shape`` the input shape (e.g. ``[1, 28, 28]``, or ``[context + 1]`` for text; its product is the number of
    values per row), ``scale`` the factor that maps stored values to model inputs (e.g. 1/255; 1 for text)."""

    column: str = Field(min_length=1)
    dtype: Literal["uint8", "uint16", "int32", "float32"]
    shape: list[int] = Field(min_length=1)
    scale: float = Field(gt=0)

    @model_validator(mode="after")
    def _positive_shape(self) -> FeatureSchema:
        if any(n < 1 for n in self.shape):
            raise ValueError(f"shape {self.shape}: every dimension must be >= 1")
        return self


class LabelSchema(_Record):
    """The label column: integers (``dtype`` one of int8 … uint64)."""

    column: str = Field(min_length=1)
    dtype: Literal[INTEGER_DTYPES]  # type: ignore[valid-type]


class TextSchema(_Record):
    """A text domain's tokens (language modelling): ``vocab_size`` token ids ``0 .. vocab_size - 1``; ``tokenizer``
    ``bytes`` (UTF-8 bytes, ids 0-255) or the path of the tokenizer file that made them; ``eos`` the id that ends each
    document (documents are packed back to back into blocks); ``context`` the tokens the model reads per block."""

    vocab_size: int = Field(ge=2)
    tokenizer: str = Field(min_length=1)
    eos: int = Field(ge=0)
    context: int = Field(ge=1)


class ShardSchema(_Record):
    """The columns every shard of the domain has: features and, for classification, a label; or, for text, features
    only (token blocks) and ``text``."""

    features: FeatureSchema
    label: LabelSchema | None = None
    text: TextSchema | None = None

    @model_validator(mode="after")
    def _one_task(self) -> ShardSchema:
        if (self.label is None) == (self.text is None):
            raise ValueError("give either a label column (classification) or text (token blocks), not both or none")
        if self.text is not None:
            if self.features.shape != [self.text.context + 1]:
                raise ValueError(f"features.shape is {self.features.shape}; token blocks of a text domain need "
                                 f"[context + 1] = [{self.text.context + 1}]")
            limit = {"uint8": 2**8, "uint16": 2**16, "int32": 2**31}[self.features.dtype]
            if self.text.vocab_size > limit:
                raise ValueError(f"text.vocab_size {self.text.vocab_size} does not fit features.dtype "
                                 f"{self.features.dtype}")
            if self.text.eos >= self.text.vocab_size:
                raise ValueError(f"text.eos {self.text.eos} is outside the vocabulary of {self.text.vocab_size}")
        elif self.features.dtype not in ("uint8", "float32"):
            raise ValueError(f"features.dtype {self.features.dtype}: a classification domain's features are uint8 "
                             f"or float32")
        if self.text is not None and self.features.dtype == "float32":
            raise ValueError("features.dtype float32: a text domain's features are token ids (uint8, uint16, int32)")
        return self


class ShardEntry(_Record):
    """One Parquet file: its ``path`` relative to the domain URI, its ``rows`` and the ``sha256`` of its bytes."""

    path: str = Field(min_length=1)
    rows: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitListing(_Record):
    """One split: its shards, their total ``rows`` and its ``digest``."""

    rows: int = Field(ge=0)
    digest: str = Field(min_length=1)
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _rows_add_up(self) -> SplitListing:
        total = sum(s.rows for s in self.shards)
        if total != self.rows:
            raise ValueError(f"rows is {self.rows}, its shards hold {total}")
        return self


class Manifest(_Record):
    """A domain's ``manifest.json``.

    Attributes:
        format: ``lifelong-shards/1``. domain: the domain's name when it was built. shard_schema (``schema`` in the
            file): the columns. label_set: the labels the domain may hold (every split's labels must be in it).
        splits: ``train`` and ``test``, and ``val`` if the domain has one. digest: the domain's digest.
        source, origin: what the shards were built from (``shards build`` records them; optional by hand).
    """

    format: Literal["lifelong-shards/1"]
    domain: str = Field(min_length=1)
    shard_schema: ShardSchema = Field(alias="schema")
    label_set: list[int]
    splits: dict[Literal["train", "val", "test"], SplitListing]
    digest: str = Field(min_length=1)
    source: dict[str, Any] | None = None
    origin: str | None = None

    @model_validator(mode="after")
    def _required_splits(self) -> Manifest:
        missing = [s for s in ("train", "test") if s not in self.splits]
        if missing:
            raise ValueError(f"splits: no '{missing[0]}' split")
        if len(set(self.label_set)) != len(self.label_set):
            raise ValueError("label_set: repeated labels")
        if self.shard_schema.label is not None and not self.label_set:
            raise ValueError("label_set: a classification domain needs at least one label")
        if self.shard_schema.text is not None and self.label_set:
            raise ValueError("label_set: a text domain has no labels; leave it empty")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The manifest as the JSON it came from (``schema`` under its file name), with an empty ``val`` split added
        when the domain has none."""
        out = self.model_dump(mode="json", by_alias=True)
        out["splits"].setdefault("val", {"rows": 0, "digest": "", "shards": []})
        return out


def parse(raw: Any) -> Manifest:
    """Validate a parsed ``manifest.json``.

    Raises:
        pydantic.ValidationError: naming the fields at fault.
    """
    return Manifest.model_validate(raw)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json`` (``lifelong shards schema`` prints it)."""
    return Manifest.model_json_schema(by_alias=True)
