"""A tree of tensors and JSON values as one safetensors file: how strategy state crosses shared storage.

A strategy's state (a replay buffer, Fishers, importance, masks) is a nested structure of dicts, lists and tuples
whose leaves are tensors, numbers, strings, booleans and None. :func:`dumps` stores every tensor as a safetensors
entry and the structure around them as JSON in the file's metadata (key ``lifelong.tree``), where each tensor is
``{"$tensor": "<entry>"}``; :func:`loads` rebuilds it. Nothing is pickled either way: a file on a bucket that anyone
could write holds data, never code (``torch.load(weights_only=False)`` would run whatever it was given).

The format is safetensors' own (https://huggingface.co/docs/safetensors): 8 bytes, the header's length (little-endian
u64), then the JSON header (each entry's dtype, shape and byte range, and ``__metadata__``), then the bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

TREE_KEY = "lifelong.tree"


def dumps(tree: Any) -> bytes:
    """The safetensors bytes of ``tree`` (tensors are copied to contiguous CPU memory).

    Raises:
        TypeError: a leaf is neither a tensor nor a JSON value (naming its path in the tree, e.g. ``[0].memory.x``).
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, set(), "")
    return save_tensors(tensors, metadata={TREE_KEY: json.dumps(structure, allow_nan=True)})


def loads(blob: bytes) -> Any:
    """The tree that :func:`dumps` wrote into ``blob``.

    Raises:
        ValueError: ``blob`` is not a safetensors file with a ``lifelong.tree`` entry in its metadata, or the tree
            refers to a tensor the file lacks.
    """
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + length])
        structure = json.loads(header["__metadata__"][TREE_KEY])
        tensors = load_tensors(blob)
    except (struct.error, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"not a lifelong tensor file ({type(e).__name__}: {str(e)[:120]})") from None
    return _decode(structure, tensors)


def _encode(node: Any, tensors: dict[str, torch.Tensor], storages: set[int], path: str) -> Any:
    """``node`` as JSON, its tensors added to ``tensors`` (one whose storage is already there, or that views part of
    a larger one, is copied: safetensors refuses shared memory)."""
    if isinstance(node, torch.Tensor):
        name = str(len(tensors))
        t = node.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
        return {"$tensor": name}
    if isinstance(node, dict):
        return {"$dict": [[_key(k, path), _encode(v, tensors, storages, f"{path}.{k}")] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        items = [_encode(v, tensors, storages, f"{path}[{i}]") for i, v in enumerate(node)]
        return {"$tuple": items} if isinstance(node, tuple) else items
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"strategy state at {path or '<root>'}: {type(node).__name__} is neither a tensor nor a JSON "
                    "value (str, int, float, bool, None, list, tuple, dict)")


def _key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"strategy state at {path or '<root>'}: a dict key of type {type(key).__name__} (keys must be "
                    "str, int, float, bool or None)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if isinstance(node, dict):
        if "$tensor" in node:
            if node["$tensor"] not in tensors:
                raise ValueError(f"not a lifelong tensor file (the tree names a missing tensor {node['$tensor']})")
            return tensors[node["$tensor"]]
        if "$tuple" in node:
            return tuple(_decode(v, tensors) for v in node["$tuple"])
        return {k: _decode(v, tensors) for k, v in node["$dict"]}
    return node
