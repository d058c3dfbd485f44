"""Checking the private Flower names a fenced module relies on, before a user's run does.

MedTune calls Flower's private API in two places only: the in-process simulation runtime
(flower_engine.py) and a site's task runner (site_runtime.py). Each lists every private name it
uses; tests check the lists against the installed Flower, so a release that moves one fails a
test, not a hospital's run.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any


def missing_names(names: Iterable[tuple[str, str]]) -> list[str]:
    """The (module, attribute path) pairs the installed Flower lacks, as `module.attribute`."""
    missing = []
    for module_name, attribute in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name} (module)")
            continue
        target: Any = module
        for part in attribute.split("."):
            try:  # static lookup: some of Flower's properties raise when read outside a run
                target = inspect.getattr_static(target, part)
            except AttributeError:
                missing.append(f"{module_name}.{attribute}")
                break
    return missing


def missing_arguments(function: Any, label: str, arguments: Iterable[str]) -> list[str]:
    """The keyword arguments `function` no longer accepts, as `label(name=...)`."""
    accepted = inspect.signature(function).parameters
    return [f"{label}({name}=...)" for name in arguments if name not in accepted]
