"""Counting the calls of a function wherever the code reached it from, for the read-once tests.

A module that did `from medtune.epsilon import read_epsilon` holds its own reference, so the
function is replaced in every loaded module that holds it, and in its own module, where imports
made later (inside functions) find it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

Calls = dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]]


@contextmanager
def counting_calls(*functions: Callable[..., Any]) -> Iterator[Calls]:
    """Within the block, every call of each function is recorded (its arguments) under its name."""
    calls: Calls = {function.__name__: [] for function in functions}
    with pytest.MonkeyPatch.context() as patch:
        for function in functions:

            def counted(*args: Any, _f: Callable[..., Any] = function, **kwargs: Any) -> Any:
                calls[_f.__name__].append((args, kwargs))
                return _f(*args, **kwargs)

            for module in list(sys.modules.values()):
                if getattr(module, function.__name__, None) is function:
                    patch.setattr(module, function.__name__, counted)
        yield calls


def epsilon_sources(calls: Calls) -> list[str]:
    """The `source` each recorded `read_epsilon` call named (where the value came from)."""
    return [
        args[1] if len(args) > 1 else kwargs.get("source", "")
        for args, kwargs in calls["read_epsilon"]
    ]
