"""The exchanged state: the only arrays that ever leave a hospital, and the name they travel under.

One definition, used by the model (read out / load in), the client (send), the server
(validate, aggregate) and checkpoints. Names are fixed; shapes follow from the prompt length,
the backbone's hidden size and the federation's label count; the dtype is float32.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from medtune.errors import ConfigError, StateError

PROMPT = "prompt"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
# their order wherever the state travels as a list
EXCHANGED_NAMES = (PROMPT, HEAD_WEIGHT, HEAD_BIAS)
STATE_DTYPE = np.dtype(np.float32)

# A hospital's name is the one identity that crosses the wire with its state. The coordinator names
# files after it (out/updates/<round>/<hospital>.safetensors) and `medtune certs node` names key
# files after it, so it must be a safe file name on every side.
HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_hospital_name(hospital: str, source: str) -> str:
    """A hospital name that is safe as a file name on every side, or an error naming where it came
    from."""
    if not HOSPITAL_NAME.fullmatch(hospital):
        raise ConfigError(
            f"{source} {hospital!r}: use 1-64 letters, digits, '.', '-' or '_', starting with a "
            "letter or digit"
        )
    return hospital


@dataclass(frozen=True)
class ExchangedStateSpec:
    """Names, shapes and dtype of the exchanged state for one federation."""

    prompt_length: int
    hidden_size: int
    num_labels: int

    @property
    def shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        shapes = (
            (self.prompt_length, self.hidden_size),
            (self.num_labels, self.hidden_size),
            (self.num_labels,),
        )
        return OrderedDict(zip(EXCHANGED_NAMES, shapes, strict=True))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def num_bytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes.values()) * STATE_DTYPE.itemsize

    def check(
        self, arrays: dict[str, np.ndarray], source: str = "state"
    ) -> "OrderedDict[str, np.ndarray]":
        """Return the arrays in canonical order, or raise naming the first mismatch.

        Checks names, shapes, dtype and finiteness: nothing else may pass for the exchanged state.
        """
        names = set(arrays)
        missing = [name for name in self.names if name not in names]
        extra = sorted(names - set(self.names))
        if missing or extra:
            raise StateError(
                f"{source}: arrays must be exactly {list(self.names)}; missing {missing}, "
                f"unexpected {extra}"
            )
        checked: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, shape in self.shapes.items():
            array = np.asarray(arrays[name])
            if array.shape != shape:
                raise StateError(f"{source}: '{name}' has shape {array.shape}, expected {shape}")
            if array.dtype != STATE_DTYPE:
                raise StateError(
                    f"{source}: '{name}' has dtype {array.dtype}, expected {STATE_DTYPE}"
                )
            if not np.all(np.isfinite(array)):
                raise StateError(f"{source}: '{name}' contains NaN or infinite values")
            checked[name] = array
        return checked


def state_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over a state's arrays (names, dtypes, shapes and bytes): which global state a round
    started from."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode("utf-8"))
        digest.update(array.tobytes())
    return digest.hexdigest()


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (update - reference) over all exchanged arrays at once, computed in float64.

    The distance moved in one round rather than the norm of the whole state: the prompt starts as
    vocabulary embeddings, so the state's own norm depends on the backbone and says nothing about
    one hospital's step, while the distance moved is what one hospital can push the aggregate by.
    An honest hospital's distance is bounded by its optimiser: Adam moves each coordinate by about
    the learning rate per step (at most ~3x), so a round moves the state by at most about
    3 x lr x steps x sqrt(parameters), and under DP noise by far less.
    The default `max-update-norm` = 100 is above that worst case for the default recipe and far
    above what honest default updates move (docs/benchmarks.md, "How the defaults were chosen"), so
    no honest default update is refused, while a scaled, garbled or runaway update (1e3 and up) is.
    Raise it for larger learning rates, more local epochs or much larger hospitals (`update_norm` in
    results.json shows each accepted update's distance).
    """
    squares = sum(
        np.sum(np.square(update[name].astype(np.float64) - reference[name])) for name in reference
    )
    return float(np.sqrt(squares))
