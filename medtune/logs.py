"""Quiet, readable output: library chatter that says nothing to a MedTune user is silenced.

Used by the CLI and by the Flower apps, which run in their own processes (Ray workers,
SuperNodes) and would otherwise print Opacus and transformers warnings every round.
"""

from __future__ import annotations

import logging
import warnings

SILENCED_WARNINGS = ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the largest alpha")


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a MedTune user (documented in the README)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # The PRV accountant takes log(0) on purpose at the edge of its grid; its result is exact.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants\.analysis\.prv")
    logging.getLogger("opacus").setLevel(logging.ERROR)
    flower = logging.getLogger("flwr")
    flower.setLevel(logging.WARNING)
    flower.propagate = False
