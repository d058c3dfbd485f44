"""Quiet, readable output: library chatter that says nothing to a MedTune user is silenced, and
MedTune's own lines and errors are shown as one line each.

Used by the CLI and by the Flower apps, which run in their own processes (Ray workers,
SuperNodes) and would otherwise print Opacus and transformers warnings every round, and
Flower's traceback under every MedTuneError.
"""

from __future__ import annotations

import logging
import sys
import warnings

from medtune.errors import MedTuneError

SILENCED_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "Optimal order is the largest alpha",
)


class OneLineErrors(logging.Filter):
    """Flower logs an app's exception with its traceback ("ServerApp raised an exception", exit code
    201). A MedTuneError's message already says what to do: its record keeps Flower's words and
    gains that message, without the traceback. Flower still ends the run as failed, with the message
    as its details."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, MedTuneError):
            record.msg, record.args = f"{record.getMessage()}: {error}", ()
            record.exc_info, record.exc_text = None, None
        return True


class AboveProgressBars(logging.Handler):
    """One line per record on sys.stderr as it is when the record comes (pytest and redirections
    replace it after set-up), written above any progress bar rather than into it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        # a closed stream, a bad format: reported by logging, never raised
        except (OSError, ValueError, TypeError):
            self.handleError(record)


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a MedTune user (documented in the README),
    Flower's tracebacks under a MedTuneError included."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # The PRV accountant takes log(0) on purpose at the edge of its grid; its result is exact.
    warnings.filterwarnings(
        "ignore", category=RuntimeWarning, module=r"opacus\.accountants\.analysis\.prv"
    )
    logging.getLogger("opacus").setLevel(logging.ERROR)
    flower = logging.getLogger("flwr")
    flower.setLevel(logging.WARNING)
    flower.propagate = False
    if not any(isinstance(f, OneLineErrors) for f in flower.filters):
        flower.addFilter(OneLineErrors())


def show_medtune_lines() -> None:
    """MedTune's own progress lines (INFO: a feature cache built, with its size) and warnings on
    stderr, as a command's output. The CLI calls it; a site's runner logs with timestamps of its
    own."""
    medtune = logging.getLogger("medtune")
    medtune.setLevel(logging.INFO)
    if not any(isinstance(h, AboveProgressBars) for h in medtune.handlers):
        medtune.addHandler(AboveProgressBars())
