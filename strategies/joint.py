"""Joint training: the offline upper bound of continual learning.

Stage k trains on the union of the training data of domains 0..k (the "offline" row of Hsu et al. 2018, Table 2;
Avalanche's ``Cumulative``), starting from stage k-1's model.
"""

from __future__ import annotations

from strategies.base import Strategy


class Joint(Strategy):
    """Stage k streams the training shards of every domain up to and including k."""

    name = "joint"

    def train_domains(self, task_id: int) -> list[int]:
        """Domains 0..task_id."""
        return list(range(task_id + 1))
