"""Language models: a small built-in decoder-only transformer, and a Hugging Face ``transformers`` causal LM.

Both map token ids ``[B, L]`` (int64) to next-token logits ``[B, L, vocab]`` and list their units for unit-level
methods (DAS, ``strategies/units.py``): each layer's attention heads and its MLP's hidden neurons.

``gpt`` (``model: {name: gpt, layers, heads, width, context}``) is GPT-2's block (Radford et al. 2019): pre-LayerNorm,
causal multi-head self-attention (``torch.nn.functional.scaled_dot_product_attention``), a 4x GELU MLP, learned
position embeddings, and an untied output layer. At 2 layers of width 128 it has about 0.5 M parameters and trains on
AG News' bytes on two CPU cores in minutes.

``hf`` (``model: {name: hf, hf: {config: {...}} or {path: ...}}``) wraps ``transformers.AutoModelForCausalLM``,
built from a config (random weights) or loaded from a local folder; nothing is downloaded (``local_files_only``).
Its units are found for GPT-2-style models (``transformer.h[i].attn``/``.mlp``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.errors import LifelongError
from strategies.units import Unit


class Attention(nn.Module):
    """Causal multi-head self-attention: ``[B, L, W]`` -> ``[B, L, W]``.

    The heads' outputs pass through ``heads`` (an identity) before the output projection, so that a unit gate of
    ``[n_heads]`` can scale each head there; the query, key and value rows of head h are rows ``h d .. (h+1) d`` of
    ``q``, ``k`` and ``v`` (``d = W / n_heads``).
    """

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.heads = nn.Identity()
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, W]`` -> ``[B, L, W]``."""
        b, n, w = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, w // self.n_heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(self.heads(y.transpose(1, 2).reshape(b, n, w)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (``[B, L, W]``)."""

    def __init__(self, width: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, n_heads, dropout)
        self.fc, self.proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, W]`` -> ``[B, L, W]``."""
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """A decoder-only transformer: token ids ``[B, L]`` (``L <= context``) -> logits ``[B, L, vocab]``.

    Args:
        vocab: token ids (the output width). context: longest sequence (position embeddings). layers, heads, width:
            the transformer's depth, heads per layer and model width (a multiple of ``heads``). dropout: on
            attention, residual branches and embeddings.
    Raises:
        LifelongError: if ``width`` is not a multiple of ``heads``.
    """

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise LifelongError(f"model.width {width} is not a multiple of model.heads {heads}")
        self.context, self.n_heads = context, heads
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` int64 token ids -> ``[B, L, vocab]`` logits."""
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.drop(self.tokens(x) + self.positions(positions))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def cl_units(self) -> list[Unit]:
        """Per layer: its attention heads (``blocks.i.attn.heads``, produced by the q, k and v rows of each head) and
        its MLP's hidden neurons (``blocks.i.fc``)."""
        units = []
        for i, block in enumerate(self.blocks):
            a = block.attn
            units.append(Unit(f"blocks.{i}.attn.heads", a.heads, a.n_heads, -1, a.q.out_features // a.n_heads,
                              tuple((p, 0) for proj in (a.q, a.k, a.v) for p in (proj.weight, proj.bias))))
            units.append(Unit(f"blocks.{i}.fc", block.fc, block.fc.out_features))
        return units


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights and embeddings, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM as a lifelong model: ``[B, L]`` token ids -> ``[B, L, vocab]`` logits.

    Args:
        vocab: the shards' vocabulary, which the model's must cover.
        config: a ``transformers`` config as a dict (``model_type`` names the architecture, default gpt2; random
            weights), or path: a local folder with ``config.json`` and weights (``from_pretrained``,
            ``local_files_only``: nothing is downloaded).
    Raises:
        LifelongError: transformers not installed, an unreadable folder or config, or a vocabulary smaller than the
            shards'.
    """

    def __init__(self, vocab: int, config: dict[str, Any] | None = None, path: str | None = None) -> None:
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise LifelongError("model.name hf needs transformers: pip install 'lifelong[hf]'") from None
        try:
            if path is not None:
                self.lm = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            else:
                settings = dict(config or {})
                cfg = transformers.AutoConfig.for_model(settings.pop("model_type", "gpt2"), **settings)
                self.lm = transformers.AutoModelForCausalLM.from_config(cfg)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LifelongError(f"model.hf: cannot build the model: {str(e).splitlines()[0]}") from None
        have = self.lm.get_output_embeddings().weight.shape[0]
        if have < vocab:
            raise LifelongError(f"model.hf: its vocabulary has {have} tokens, the shards use {vocab}")
        for block in _gpt2_blocks(self.lm):  # a gate point on the heads' outputs (see cl_units)
            block.attn.c_proj.heads_gate = nn.Identity()
            block.attn.c_proj.register_forward_pre_hook(_gate_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` int64 token ids -> ``[B, L, vocab]`` logits."""
        return self.lm(input_ids=x, use_cache=False).logits

    def cl_units(self) -> list[Unit]:
        """For GPT-2-style blocks (``transformer.h``): each layer's heads (gated at the input of ``attn.c_proj``;
        produced by the heads' columns of the fused query-key-value ``c_attn``, a transposed ``Conv1D``) and its MLP
        neurons (``mlp.c_fc``'s outputs); none for other architectures."""
        units = []
        for i, block in enumerate(_gpt2_blocks(self.lm)):
            attn, fc = block.attn, block.mlp.c_fc
            units.append(Unit(f"lm.transformer.h.{i}.attn.c_proj.heads_gate", attn.c_proj.heads_gate, attn.num_heads,
                              -1, attn.head_dim, ((attn.c_attn.weight, 1), (attn.c_attn.bias, 0))))
            units.append(Unit(f"lm.transformer.h.{i}.mlp.c_fc", fc, fc.nf, -1, 1, ((fc.weight, 1), (fc.bias, 0))))
        return units


def _gpt2_blocks(lm: nn.Module) -> list[nn.Module]:
    """The GPT-2-style blocks of a Hugging Face model (``transformer.h``, each with ``attn.c_attn``, ``attn.c_proj``
    and ``mlp.c_fc``), or none."""
    blocks = getattr(getattr(lm, "transformer", None), "h", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "c_attn") for b in blocks):
        return []
    return list(blocks)


def _gate_heads(c_proj: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of a GPT-2 ``attn.c_proj``: its input (the heads, concatenated: ``[B, L, W]``) passes through
    its ``heads_gate`` identity, where a unit gate can scale each head. A module-level function that finds the gate
    on the module it is called with, so that a deep copy of the model gates its own heads."""
    return (c_proj.heads_gate(args[0]), *args[1:])
