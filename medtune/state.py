"""The exchanged state: the only arrays that ever leave a hospital.

One definition, used by the model (read out / load in), the client (send), the server
(validate, aggregate) and checkpoints. Names are fixed; shapes follow from the prompt length,
the backbone's hidden size and the federation's label count; the dtype is float32.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from medtune.errors import StateError

PROMPT = "prompt"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
STATE_DTYPE = np.dtype(np.float32)



@dataclass(frozen=True)
class ExchangedStateSpec:
    """Names, shapes and dtype of the exchanged state for one federation."""

    prompt_length: int
    hidden_size: int
    num_labels: int

    @property
    def shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        return OrderedDict(
            [
                (PROMPT, (self.prompt_length, self.hidden_size)),
                (HEAD_WEIGHT, (self.num_labels, self.hidden_size)),
                (HEAD_BIAS, (self.num_labels,)),
            ]
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def num_bytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes.values()) * STATE_DTYPE.itemsize

    def check(self, arrays: dict[str, np.ndarray], source: str = "state") -> "OrderedDict[str, np.ndarray]":
        """Return the arrays in canonical order, or raise naming the first mismatch.

        Checks names, shapes, dtype and finiteness: nothing else may pass for the exchanged state.
        """
        names = set(arrays)
        missing = [name for name in self.names if name not in names]
        extra = sorted(names - set(self.names))
        if missing or extra:
            raise StateError(
                f"{source}: arrays must be exactly {list(self.names)}; missing {missing}, unexpected {extra}"
            )
        checked: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, shape in self.shapes.items():
            array = np.asarray(arrays[name])
            if array.shape != shape:
                raise StateError(f"{source}: '{name}' has shape {array.shape}, expected {shape}")
            if array.dtype != STATE_DTYPE:
                raise StateError(f"{source}: '{name}' has dtype {array.dtype}, expected {STATE_DTYPE}")
            if not np.all(np.isfinite(array)):
                raise StateError(f"{source}: '{name}' contains NaN or infinite values")
            checked[name] = array
        return checked
