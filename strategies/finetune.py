"""Finetune (naive sequential training): the lower bound of continual learning.

Each stage simply continues training the previous stage's model on the new domain. It has no state and no hooks;
in class-IL it forgets earlier domains almost completely (Hsu et al. 2018, Table 2, "Adam" row: 19.71% on
Split-MNIST).
"""

from __future__ import annotations

from strategies.base import Strategy


class Finetune(Strategy):
    """Plain sequential finetuning; all hooks are the no-op defaults."""

    name = "finetune"
