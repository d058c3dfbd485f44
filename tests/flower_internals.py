"""Every Flower internal the tests touch, in one place, with why (written against flwr 1.42).

The tests drive MedTune's coordinator in-process (tests/federation_harness.py) and check two facts
about Flower's runtimes that MedTune depends on. That needs these parts of Flower outside its
public API; when a Flower release changes one, the function here that uses it is what to fix.

1. `flwr.supercore.task_identity.TaskIdentity._task_id`, `._run_id`, `._node_id`: the class
   attributes behind TaskIdentity's `task_id`/`run_id`/`node_id`. Every `Message` built reads
   them (its metadata carries the running task's identity). Flower's runtimes set them, so
   in-process tests must too. The public properties have setters, but their getters raise while
   unset, and pytest's monkeypatch must read the old value to put it back. So only the private
   attributes can be set and restored (`set_task_identity`).
2. `Metadata.__dict__["_message_id"]` and `Metadata.__dict__["_src_node_id"]`: read-only
   properties in Flower's public API. Flower's own grids write them this way when a message is
   sent (flwr/superlink/grid/inmemory_grid.py, `push_messages`), and so does the SuperLink when it
   answers for a node it lost (flwr/server/superlink/linkstate/utils.py). The fake grid does what
   they do (`stamp_message_id`, `set_source_node`).
3. The source of `flwr.superlink.runtime.run_serverapp.run_serverapp`: the line that logs an
   exception a ServerApp raised. Running that runtime needs a SuperLink (its HTTP grid, a token),
   so tests/test_hostile_replies.py replays that one call instead.
   `serverapp_runtime_logs_exceptions_as_replayed` checks that the replayed line is still Flower's.
4. `flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend.init_ray`, called on an
   instance whose `__init__` has not run (`__init__` would start Ray and an actor pool).
   `__init__` sets only `init_args_key` before it calls `init_ray`. `init_ray` reaches Ray
   through the `ray` module (`ray.is_initialized`, `ray.init`), so a test that swaps those two
   sees, without starting Ray, whether and how Flower would start it
   (`start_ray_as_flowers_backend`).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from flwr.app import Message

SERVERAPP_EXCEPTION_LOG = 'log(ERROR, "%s raised an exception", exc_entity, exc_info=ex)'


def set_task_identity(
    monkeypatch: pytest.MonkeyPatch, task_id: int, run_id: int, node_id: int
) -> None:
    """The identity Flower's runtimes give the running task, set for this test and restored after it
    (1)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", task_id)
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", node_id)


def stamp_message_id(message: Message, message_id: str) -> None:
    """The id a grid gives a message when it sends it (2)."""
    message.metadata.__dict__["_message_id"] = message_id


def set_source_node(reply: Message, node_id: int) -> None:
    """The node a reply comes from, as when the SuperLink answers for a node it lost (2)."""
    reply.metadata.__dict__["_src_node_id"] = node_id


def serverapp_runtime_logs_exceptions_as_replayed() -> bool:
    """Whether Flower's ServerApp runtime still logs a ServerApp's exception with the call the test
    replays (3)."""
    from flwr.superlink.runtime import run_serverapp

    return SERVERAPP_EXCEPTION_LOG in inspect.getsource(run_serverapp)


def start_ray_as_flowers_backend(backend_config: dict[str, Any]) -> None:
    """What Flower's Ray backend does to Ray before a simulation: `RayBackend.init_ray`, on its own
    (4)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    backend = RayBackend.__new__(RayBackend)  # no actor pool; `ray` is whatever the test made it
    backend.init_args_key = "init_args"  # what RayBackend.__init__ sets before it calls init_ray
    backend.init_ray(backend_config)
