"""The one place a site calls Flower's private task runtime (flwr 1.42): MedTune in place of
`flwr-clientapp`.

A SuperNode started with `--isolation process` runs no app itself: it queues one task per message
it receives and waits for an executor to claim it on its local Runtime API. Flower's own executor
(`flower-superexec`) hands each task to `flwr-clientapp`, which installs the coordinator's FAB and
imports it. `serve` claims the tasks instead and gives each one, with the FAB's bytes, to
`answer`: MedTune's site decides there (client/site_runner.py) whether to run its installed
ClientApp or refuse, before any of the FAB's code is imported. Only a FAB the site approved by hash
is handed to Flower's `flwr-clientapp` (`hand_off`), decided from the task before anything is
pulled.

Every private name used below is in PRIVATE_NAMES and checked by tests/test_site_runtime.py
against the installed Flower (medtune/federation/private_api.py).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import Context, Message

from medtune.federation.private_api import missing_arguments, missing_names

if TYPE_CHECKING:  # annotations only: at run time the private runtime is imported where it is used
    from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("medtune.site")

PRIVATE_NAMES = (
    ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    ("flwr.supercore.constant", "TaskType.CLIENT_APP"),
    ("flwr.common.constant", "SubStatus.COMPLETED"),
    ("flwr.common.constant", "SubStatus.FAILED"),
    ("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address"),
    ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    ("flwr.supercore.retry", "RetryInvoker"),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    ("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor"),
    ("flwr.supercore.heartbeat", "HeartbeatSender"),
    ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),
    ("flwr.supernode.runtime.run_clientapp", "push_message"),
    ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
)
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the call SuperExec auth signs
# a claim that fails this long ends the loop once the SuperNode has exited
ACQUIRE_RETRY_SECONDS = 10.0
CLIENT_ARGUMENTS = (
    "server_address",
    "insecure",
    "root_certificates",
    "interceptors",
    "retry_invoker",
)

# What to do with a task's message, given its context and the FAB's bytes: the reply to push.
Answer = Callable[[Message, Context, bytes], Message]


def missing_private_names() -> list[str]:
    """Private Flower names this runner needs that the installed Flower lacks (empty:
    compatible)."""
    missing = missing_names(PRIVATE_NAMES)
    if not missing:
        from flwr.supercore.retry import RetryInvoker
        from flwr.supercore.runtime import RuntimeHttpClient

        missing += missing_arguments(
            RuntimeHttpClient.from_server_address,
            "RuntimeHttpClient.from_server_address",
            CLIENT_ARGUMENTS,
        )
        # set on its instance below
        missing += missing_arguments(RetryInvoker, "RetryInvoker", ("max_time",))
    return missing


def _client(
    runtime_address: str, interceptors: list, give_up_after: float | None = None
) -> RuntimeHttpClient:
    """A Runtime API client on loopback; `give_up_after` bounds its retries (seconds), None retries
    for ever."""
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retry = make_simple_http_retry_invoker()
    retry.max_time = give_up_after
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry,
    )


def run_task(runtime_address: str, token: str, answer: Answer) -> None:
    """One claimed task: pull its message, context and FAB, push `answer`'s reply and the task's
    end.

    The task's end (and the context, which carries the app's state between messages) is pushed
    whatever happens, so the SuperNode never waits on a task this runner dropped.
    """
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _client(
        runtime_address,
        [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details = (
        SubStatus.FAILED,
        "the site's runner failed before replying; see the site's log",
    )
    try:
        message, context, _, fab = pull_task_input(client)
        push_message(client, answer(message, context, fab.content), context)
        status, details = SubStatus.COMPLETED, ""
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def hand_off(runtime_address: str, token: str) -> None:
    """An approved FAB runs as Flower runs any app: `flwr-clientapp`, with runtime installs
    disabled."""
    subprocess.run(
        [
            "flwr-clientapp",
            "--runtime-api-address",
            runtime_address,
            "--token",
            token,
            "--insecure",
        ],
        check=False,
    )


def serve(
    runtime_address: str,
    secret: bytes,
    answer: Answer,
    approved: Callable[[str], bool],
    stop: threading.Event,
    poll_seconds: float = 0.5,
) -> None:
    """Claim the SuperNode's tasks one at a time until `stop` is set; `secret` signs each claim.

    `approved(fab_hash)` says whether the site listed that FAB's hash: such a task is handed to
    Flower's runner; every other task is answered in this process by `answer`.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    client = _client(
        runtime_address,
        [
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}),
        ],
        give_up_after=ACQUIRE_RETRY_SECONDS,
    )
    try:
        while not stop.is_set():
            try:
                claimed = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                )
            except Exception as error:  # noqa: BLE001 - the SuperNode is unreachable: end if it has exited
                if stop.is_set():
                    break
                log.warning(
                    "the SuperNode's Runtime API did not answer for %.0f s (%s); still trying",
                    ACQUIRE_RETRY_SECONDS,
                    error,
                )
                continue
            if not (claimed.HasField("task") and claimed.token):
                stop.wait(poll_seconds)
                continue
            try:
                if approved(claimed.task.fab_hash):
                    log.info(
                        "FAB %s is in approved-fabs: Flower's runner runs it",
                        claimed.task.fab_hash[:12],
                    )
                    hand_off(runtime_address, claimed.token)
                else:
                    run_task(runtime_address, claimed.token, answer)
            except Exception:  # noqa: BLE001 - one task that fails (its end is pushed) never ends the site
                log.exception(
                    "task %s of run %s failed; the site goes on",
                    claimed.task.task_id,
                    claimed.task.run_id,
                )
    finally:
        client.close()
