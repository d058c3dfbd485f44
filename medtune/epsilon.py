"""Epsilon, a hospital's privacy target, and its one meaning for "no DP".

In memory epsilon is a float, and `math.inf` (only +inf) means no DP: no clipping, no noise.
- On the wire, Flower's records carry IEEE floats, so inf travels as itself.
- In every text MedTune writes (ledger.json, meta.json, results.json, sweep and tuning files), JSON
  has no infinity, so +inf is written as the string "inf" (medtune/files.py does it for every
  JSON file, so no writer spells it on its own).
- Every entry point (run config, scenario and sweep files, CLI flags, stored ledgers and runs) reads
  epsilon with the functions below: a number, TOML's `inf`, or the text "inf".

-inf, NaN, zero and negative targets are refused with `EpsilonError`, naming where the value came
from: a typo must never switch DP off or leave a run at another budget.
"""

from __future__ import annotations

import math
from typing import Any

from medtune.errors import ConfigError

NO_DP = "inf"  # how +inf is written in text


class EpsilonError(ConfigError):
    """An epsilon that is not a positive number or inf."""


def read_epsilon(value: Any, source: str, spent: bool = False) -> float:
    """Epsilon from a number or text: the one reader, called once where a value enters (a run
    config, a flag, a file, a reply). A target must be positive; a spent epsilon may be 0 (nothing
    spent yet).

    `source` names where the value came from (a file and key, a flag); "" when the caller names it.
    """
    where = f"{source}: " if source else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EpsilonError(f"{where}epsilon {value!r} is not a number (write {NO_DP} for no DP)")
    if not isinstance(value, str):
        return check_epsilon(float(value), source, spent)
    text = value.strip()
    try:
        epsilon = math.inf if text == NO_DP else float(text)
    except ValueError:
        raise EpsilonError(
            f"{where}epsilon {value!r} is not a number (write {NO_DP} for no DP)"
        ) from None
    if epsilon == math.inf and text != NO_DP:
        raise EpsilonError(f"{where}epsilon {value!r}: no DP is written {NO_DP}, and only so")
    return check_epsilon(epsilon, source, spent)


def check_epsilon(epsilon: float, source: str, spent: bool = False) -> float:
    """The bounds of an epsilon already read as a float: NaN, -inf, negatives and (for a target)
    zero are refused. A config object holding an epsilon checks it here, without reading it again.
    """
    where = f"{source}: " if source else ""
    if isinstance(epsilon, bool) or not isinstance(epsilon, float):
        raise EpsilonError(
            f"{where}epsilon {epsilon!r} is not a float; read text and numbers with read_epsilon"
        )
    if math.isnan(epsilon):
        raise EpsilonError(f"{where}epsilon is NaN; give a positive number, or {NO_DP} for no DP")
    if epsilon == -math.inf or epsilon < 0 or (epsilon == 0 and not spent):
        raise EpsilonError(
            f"{where}epsilon {epsilon:g} must be positive; only {NO_DP} (+infinity) means no DP"
        )
    return epsilon


def show_epsilon(epsilon: float) -> str:
    """Epsilon as people read it in tables and names: `8`, `0.5`, `inf`."""
    return NO_DP if math.isinf(epsilon) else f"{epsilon:g}"
