"""A user model factory, imported by path in tests (``tests.user_model:tiny``)."""

import math

from torch import nn


def tiny(input_shape: tuple[int, ...], num_outputs: int, width: int = 8) -> nn.Module:
    """Flatten -> Linear(width) -> ReLU -> Linear(num_outputs); input ``[B, *input_shape]``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_outputs))
