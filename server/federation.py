"""The round loop: ask who can take part, send the global prompt and head, check and aggregate the
replies, evaluate, save.

Written out rather than hidden in `Strategy.start`, because each round must also: ask first, so
that no hospital spends budget on a round that cannot reach min-hospitals; send each hospital the
coordinator's record of its ledger (medtune/ledger_record.py); key hospitals by the node they
answer from, so two sites with one name never both count; reject replies that fail the update
checks (server.validation) and record why; record hospitals that failed (bad data file, corrupted
ledger) and go on with the others; drop hospitals whose budget is spent; record what crossed the
wire; checkpoint; and stop once no hospital can train any more.

A resumed run starts where server.resume says; each exchange waits and reads its replies as
server.replies does. Each round's steps take the round's values and return its rows: only what the
run keeps across rounds (the global state, the results, who is which node, who stopped) lives on
the `Federation`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from safetensors.numpy import save as save_safetensors

from medtune.backbone import Backbone, load_backbone
from medtune.checkpoint import Checkpoint, save_checkpoint
from medtune.epsilon import read_epsilon
from medtune.errors import FederationError, StateError
from medtune.federation.results import (
    RESULTS_FILE,
    SENT_STATE,
    HospitalRound,
    RoundRecord,
    RunResults,
    print_round,
    updates_folder,
)
from medtune.federation.secure_aggregation import COUNTS, COUNTS_SCALE, PURPOSE, secure_mean
from medtune.federation.wire import (
    ARRAYS,
    FAILED,
    LEDGER_RECORD,
    READY,
    REJECTED,
    STOPPED,
    TRAINED,
    evaluation_from_reply,
    from_counts_vector,
    record_to_wire,
    to_record,
)
from medtune.files import atomic_write_bytes
from medtune.label_prior import initial_model
from medtune.ledger_record import LedgerRecord, Spend
from medtune.metrics import Evaluation, pool
from medtune.run_config import RunSettings
from medtune.state import STATE_DTYPE, ExchangedStateSpec, update_norm
from medtune.stopping import recording
from server.replies import IdleDeadline, Reply, collect_replies, read_train_metrics
from server.resume import resume_run
from server.strategy import aggregate, build_strategy, save_strategy_state, trimming_note
from server.validation import CheckedUpdate, check_train_reply

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

log = logging.getLogger("medtune.server")

CONNECT_POLL_SECONDS = 0.5  # how often the number of connected hospitals is checked


def checkpoint_dir(out: Path, server_round: int) -> Path:
    return out / "checkpoints" / f"round_{server_round:03d}"


class Federation:
    """One run of the federation, from the seed or from a checkpoint."""

    def __init__(self, grid: Grid, settings: RunSettings, console: Console | None = None) -> None:
        self.grid = grid
        self.settings = settings
        self.console = console or Console()
        self.backbone: Backbone = load_backbone(settings.model.backbone, settings.model.num_layers)
        labels = settings.data.labels
        self.spec = ExchangedStateSpec(
            settings.model.prompt_length, self.backbone.hidden_size, len(labels)
        )
        self.stopped: set[int] = set()  # nodes no longer sent training rounds
        # hospitals whose ledger went back: they spend without a true record
        self.excluded: set[str] = set()
        self.claims: dict[int, str] = {}  # node id -> the hospital name it last answered with
        # hospital name -> the one node that is that hospital in this run
        self.bindings: dict[str, int] = {}
        # nodes claiming a name bound to another connected node
        self.refused_nodes: set[int] = set()
        self.arrays: dict[str, np.ndarray]
        if settings.resume is None:
            self.strategy = build_strategy(settings.federation, settings.train.learning_rate)
            self.results = RunResults(config=settings.run_config)
            model = initial_model(self.backbone, settings.model, settings.data, seed=settings.seed)
            self.arrays, self.first_round = dict(model.exchanged_state()), 1
        else:
            resumed = resume_run(settings.resume, settings, self.backbone.fingerprint)
            self.strategy, self.results = resumed.strategy, resumed.results
            self.arrays, self.first_round = resumed.arrays, resumed.first_round
            self._event(resumed.event)
        # a resumed run keeps each hospital on the node it last trained from
        for record in self.results.rounds:
            for row in record.hospitals:
                if row.node and row.status in (TRAINED, STOPPED):
                    self.bindings[row.name] = int(row.node)
        note = trimming_note(settings.federation, settings.source.hospitals)
        if note:
            self._event(note)

    def _event(self, text: str) -> None:
        self.results.events.append(text)
        self.console.print(f"[bold]{text}[/bold]")

    def _wait_for_hospitals(self) -> None:
        """Wait for every expected hospital to connect before round 1's sampling, for as long as
        they keep connecting: round-timeout with no new connection ends the wait, as with replies
        (server.replies.IdleDeadline), so a slow start of many sites is not cut short."""
        expected = self.settings.source.hospitals
        deadline = IdleDeadline(self.settings.federation.round_timeout)
        connected = len(list(self.grid.get_node_ids()))
        while connected < expected and deadline.remaining() > 0:
            time.sleep(CONNECT_POLL_SECONDS)
            now_connected = len(list(self.grid.get_node_ids()))
            if now_connected > connected:
                deadline.progressed()
            connected = now_connected
        if connected < expected:
            self._event(f"only {connected} of {expected} hospitals connected; going on with them")

    def run(self) -> RunResults:
        settings = self.settings
        rounds = settings.federation.rounds
        self._wait_for_hospitals()
        for server_round in range(self.first_round, settings.last_round + 1):
            started = time.monotonic()
            sent = dict(self.arrays)
            trained = self._train_round(server_round)
            if trained is None:
                break  # the hospitals that can still pay for a round are too few: the run is over
            trained_rows, accepted, aggregated = trained
            hospitals, global_eval = self._evaluate_round(server_round, trained_rows)
            record = RoundRecord(
                round=server_round,
                aggregated=aggregated,
                accuracy=global_eval.accuracy if global_eval else None,
                macro_f1=global_eval.macro_f1 if global_eval else None,
                loss=global_eval.loss if global_eval else None,
                worst_accuracy=min(
                    (h.accuracy for h in hospitals if h.accuracy is not None), default=None
                ),
                wall_seconds=time.monotonic() - started,
                hospitals=hospitals,
                secure=settings.federation.secure_aggregation,
            )
            with recording():  # a stopped run records nothing of the interrupted round
                self.results.rounds.append(record)
                print_round(record, rounds, self.console)
                if self.settings.keeps_updates:
                    self._keep_updates(server_round, sent, accepted)
                if self._trained_ever():
                    self._save(server_round)
                else:
                    self.results.save(settings.out)
        self.results.save(settings.out)
        if not self._trained_ever():
            raise FederationError(
                "no hospital trained in any round (see the reasons in "
                f"{settings.out / RESULTS_FILE}); no checkpoint was written, since it would be the "
                "untrained model"
            )
        return self.results

    def _trained_ever(self) -> bool:
        """Whether any round so far aggregated updates: before that, a checkpoint would be the
        untrained model."""
        return any(r.aggregated for r in self.results.rounds)

    def _train_round(
        self, server_round: int
    ) -> tuple[list[HospitalRound], list[CheckedUpdate], bool] | None:
        """One round's training exchange and aggregation: the hospitals' records, the valid updates,
        and whether they were aggregated (at least min-hospitals). None: too few can pay for the
        round."""
        federation = self.settings.federation
        sent = to_record(self.arrays)
        planned = list(self.strategy.configure_train(server_round, sent, ConfigRecord(), self.grid))
        config = (
            planned[0].content.config_records["config"]
            if planned
            else ConfigRecord({"server-round": server_round})
        )
        nodes = [
            m.metadata.dst_node_id for m in planned if m.metadata.dst_node_id not in self.stopped
        ]
        ready, absent = self._ask_ready(server_round, nodes, sent, config)
        if not self._enough_to_train(server_round, ready, absent):
            return None
        if federation.secure_aggregation:
            return self._secure_round(server_round, ready, absent, config)
        # Nodes refused for their name get the instruction too: its record tells them why, in their
        # own log.
        messages = [
            self._instruction(MessageType.TRAIN, node, sent, config)
            for node in ready + sorted(self.refused_nodes & set(nodes))
        ]
        hospitals = list(absent)
        accepted: list[CheckedUpdate] = []
        for reply in self._exchange(server_round, "training", messages):
            row = HospitalRound(
                name=self._row_name(server_round, reply.node, reply.name),
                status=reply.status,
                reason=reply.reason,
                bytes_down=sent.count_bytes(),
                node=str(reply.node),
            )
            row, update = self._read_train_reply(server_round, reply, row)
            if update is not None:
                accepted.append(update)
            if row.status == STOPPED or reply.name in self.excluded:
                self.stopped.add(reply.node)
            hospitals.append(row)
        aggregated = len(accepted) >= federation.min_hospitals
        if aggregated:
            new_arrays = aggregate(self.strategy, server_round, accepted)
            self.arrays = dict(
                self.spec.check(new_arrays, source=f"round {server_round} aggregate")
            )
        else:
            self._event(
                f"round {server_round}: {len(accepted)} valid update(s), fewer than min-hospitals="
                f"{federation.min_hospitals}; round skipped, the global state is kept"
            )
        return sorted(hospitals, key=lambda h: h.name), accepted, aggregated

    def _instruction(
        self, kind: str, node: int, sent: ArrayRecord, config: ConfigRecord
    ) -> Message:
        """One node's query or train message: the global state, the round's config, and the
        coordinator's record of that node's hospital's ledger (none while the node has not yet said
        who it is)."""
        content = RecordDict({ARRAYS: sent, "config": self._node_config(node, config)})
        return Message(content, dst_node_id=node, message_type=kind)

    def _node_config(self, node: int, config: ConfigRecord) -> ConfigRecord:
        """The round's config for one node, with the coordinator's record of its hospital's
        ledger."""
        record = self._ledger_record(node)
        return (
            config
            if record is None
            else ConfigRecord({**config, LEDGER_RECORD: record_to_wire(record)})
        )

    def _secure_round(
        self,
        server_round: int,
        ready: list[int],
        absent: list[HospitalRound],
        config: ConfigRecord,
    ) -> tuple[list[HospitalRound], list[CheckedUpdate], bool]:
        """A round through SecAgg+: the coordinator gets the weighted mean of the ready hospitals'
        prompts and heads, and each one's clear report (name, epsilon, delta, steps), never one
        hospital's arrays."""
        federation = self.settings.federation
        instructions = {
            node: (self.arrays, dict(self._node_config(node, config))) for node in ready
        }
        result = secure_mean(
            self.grid,
            server_round,
            instructions,
            federation.secagg_max_weight,
            federation.round_timeout,
        )
        hospitals = list(absent)
        for node in ready:
            report = result.reports.get(node)
            name = self._row_name(
                server_round, node, str(report["hospital"]) if report else self._node_name(node)
            )
            row = HospitalRound(
                name=name,
                status=FAILED,
                node=str(node),
                bytes_down=result.bytes_down.get(node, 0),
                bytes_up=result.bytes_up.get(node, 0),
            )
            if report is None:
                row = replace(
                    row,
                    reason="dropped out of the secure aggregation round; the details are in the "
                    "site's own log",
                )
                self._event(f"round {server_round}: {name} failed: {row.reason}")
            else:
                row = replace(
                    row,
                    status=TRAINED,
                    epsilon=read_epsilon(
                        report.get("epsilon", 0.0), f"secure report of {name}", spent=True
                    ),
                    delta=float(report.get("delta", 0.0)),
                    steps=int(report.get("steps", 0)),
                )
            hospitals.append(row)
        aggregated = result.mean is not None and len(result.reports) >= federation.min_hospitals
        accepted: list[CheckedUpdate] = []
        if aggregated and result.mean is not None:
            mean = {
                name: np.asarray(array, dtype=STATE_DTYPE) for name, array in result.mean.items()
            }
            checked = self.spec.check(mean, source=f"round {server_round} secure aggregate")
            accepted = [
                CheckedUpdate("secure-aggregate", 0, checked, 1, update_norm(checked, self.arrays))
            ]
            self.arrays = dict(
                self.spec.check(
                    aggregate(self.strategy, server_round, accepted), source="aggregate"
                )
            )
        else:
            self._event(
                f"round {server_round}: the secure aggregation ended with {len(result.reports)} "
                f"masked update(s), fewer than min-hospitals={federation.min_hospitals} or below "
                "its threshold; round skipped, the global state is kept"
            )
        return sorted(hospitals, key=lambda h: h.name), accepted, aggregated

    def _ledger_record(self, node: int) -> LedgerRecord | None:
        """What this run recorded of the ledger of the hospital `node` claims to be, and that
        hospital's node."""
        name = self.claims.get(node)
        if name is None:
            return None
        bound = self.bindings.get(name, node)
        spends = tuple(
            Spend(record.round, row.steps, row.epsilon)
            for record in self.results.rounds
            for row in record.hospitals
            if row.name == name
            and row.status in (TRAINED, STOPPED, REJECTED)
            and row.steps > 0
            and row.epsilon is not None
        )
        return LedgerRecord(hospital=name, node=bound, spends=spends if bound == node else ())

    def _ask_ready(
        self, server_round: int, nodes: list[int], sent: ArrayRecord, config: ConfigRecord
    ) -> tuple[list[int], list[HospitalRound]]:
        """Ask every node whether it can take part in this round, before any of them spends.

        Returns the nodes that are ready, and a record for each that is not (stopped, failed,
        silent, or refused for its name). A node met for the first time answered without the
        coordinator's record of its ledger: once it has said who it is, it is asked once more, with
        the record.
        """
        answers: dict[int, Reply] = {}  # node -> its last answer, under the name its row goes by
        asking = list(nodes)
        for _ in range(2):
            unknown = {node for node in asking if node not in self.claims}
            replies = self._exchange(
                server_round,
                "readiness",
                [self._instruction(MessageType.QUERY, node, sent, config) for node in asking],
            )
            for reply in sorted(replies, key=lambda reply: reply.node):  # ties: lowest node id
                name = self._row_name(server_round, reply.node, reply.name)
                answers[reply.node] = replace(reply, name=name)
            asking = [
                node
                for node in unknown
                if node in self.claims and node in answers and answers[node].status == READY
            ]
            if not asking:
                break
        ready, absent = [], []
        for node in nodes:
            answer = answers.get(node)
            if node in self.refused_nodes:
                continue  # recorded with its training reply
            if answer is not None and answer.status == READY:
                ready.append(node)
            else:
                absent.append(self._not_ready(server_round, node, answer))
        return ready, absent

    def _not_ready(self, server_round: int, node: int, answer: Reply | None) -> HospitalRound:
        """The record of a node that will not train this round (its budget is spent, it failed, or
        it did not answer), and the event that says so."""
        if answer is None:
            name, status, reason = self._node_name(node), FAILED, "no reply to the readiness query"
        else:
            name, status, reason = answer.name, answer.status, answer.reason
        if status == STOPPED:
            self.stopped.add(node)
            self._event(f"round {server_round}: {name} stopped training: privacy budget spent")
            return HospitalRound(name=name, status=STOPPED, reason=reason, node=str(node))
        if status != FAILED:
            reason = f"answered {status!r} to the readiness query"
        self._event(f"round {server_round}: {name} failed: {reason}")
        return HospitalRound(name=name, status=FAILED, reason=reason, node=str(node))

    def _enough_to_train(
        self, server_round: int, ready: list[int], absent: list[HospitalRound]
    ) -> bool:
        """Whether the ready hospitals can reach min-hospitals; if not, none is asked to spend.

        When only spent budgets keep the others out, the run is over; when any hospital failed, the
        run stops with an error that names each hospital and why.
        """
        needed = self.settings.federation.min_hospitals
        if len(ready) >= needed:
            return True
        ready_names = (
            ", ".join(sorted(self.claims.get(node, self._node_name(node)) for node in ready))
            or "none"
        )
        failing = [h for h in absent if h.status != STOPPED]
        if not failing:
            self._event(
                f"round {server_round}: every hospital's privacy budget is spent; stopping the run"
                if not ready
                else f"round {server_round}: the hospitals whose budget can pay for another round "
                f"({ready_names}) are fewer than min-hospitals={needed}; every other hospital's "
                "privacy budget is spent; stopping the run"
            )
            return False
        why = "; ".join(
            f"{h.name}: {h.reason or h.status}" for h in sorted(absent, key=lambda h: h.name)
        )
        self._event(
            f"round {server_round}: only {len(ready)} hospital(s) can take part ({ready_names}), "
            f"fewer than min-hospitals={needed}; none was asked to train. Not taking part: {why}"
        )
        self.results.save(self.settings.out)
        raise FederationError(
            f"round {server_round}: only {len(ready)} hospital(s) can take part ({ready_names}), "
            f"fewer than min-hospitals={needed}, so no hospital was asked to spend budget. Not "
            f"taking part: {why}"
        )

    def _row_name(self, server_round: int, node: int, name: str) -> str:
        """The name `node`'s row goes under: its hospital, or "name (node N)" if another node holds
        that name.

        A hospital is keyed by the authenticated node it answers from. A name is bound to the first
        node that answers with it; a second node claiming it while the first is still connected is
        refused, and nothing it sends is used (two new nodes answering one query: the lower node ID
        keeps the name). A name whose node has left (a restarted site, a
        resumed simulation) moves to the node that claims it now.
        """
        self.claims[node] = name
        bound = self.bindings.get(name)
        if bound is None or bound == node or bound not in set(self.grid.get_node_ids()):
            if bound not in (None, node):
                self._event(
                    f"round {server_round}: {name} now answers from node {node} (node {bound} has "
                    "left)"
                )
            self.bindings[name] = node
            self.refused_nodes.discard(node)
            return name
        if node not in self.refused_nodes:
            self.refused_nodes.add(node)
            self._event(
                f"round {server_round}: node {node} also calls itself {name}, which is node "
                f"{bound} in this run; node {node} is refused and nothing it sends is used"
            )
        return f"{name} (node {node})"

    def _node_name(self, node: int) -> str:
        return self.claims.get(node, f"node {node}")

    def _exchange(self, server_round: int, purpose: str, messages: list[Message]) -> list[Reply]:
        """Send, wait while replies keep coming (server.replies.collect_replies), and read each
        reply with the node it was sent to.

        Replies are matched to the node they were sent to, never to their source: when a SuperNode
        dies mid-round the error reply comes from the SuperLink. Such a reply, and every node that
        did not answer in time, is named after the hospital last seen on that node.
        """
        timeout = self.settings.federation.round_timeout
        replies = collect_replies(self.grid, messages, timeout)
        # ids are set on sending
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        read = []
        for message in replies:
            node = sent_to.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
            read.append(Reply.read(message, node, self._node_name(node)))
        answered = {message.metadata.reply_to_message_id for message in replies}
        silent = sorted(self._node_name(n) for m, n in sent_to.items() if m not in answered)
        if silent:
            self._event(
                f"round {server_round}: no {purpose} reply within {timeout} s from "
                f"{', '.join(silent)}"
            )
        return read

    def _read_train_reply(
        self, server_round: int, reply: Reply, row: HospitalRound
    ) -> tuple[HospitalRound, CheckedUpdate | None]:
        """`row` completed from one training reply, and the reply's update only if every check
        passes."""
        name, status, node = row.name, row.status, reply.node
        if status == FAILED:
            self._event(f"round {server_round}: {name} failed: {row.reason}")
            return row, None
        if node in self.refused_nodes:
            reason = f"another node holds the name {self.claims[node]}"
            return replace(row, status=REJECTED, reason=reason), None
        # What the hospital reports, for the record; only numbers are kept (the checks judge them).
        metrics = read_train_metrics(reply.message)
        row = replace(
            row,
            examples=metrics.examples,
            epsilon=metrics.epsilon,
            delta=metrics.delta,
            steps=metrics.steps,
        )
        recorded = self._recorded_steps(name)
        if status == TRAINED and row.steps <= recorded:
            reason = (
                f"its privacy ledger reports {row.steps} steps after training, but this run "
                f"recorded {recorded} before: the site's ledger was deleted or replaced; it takes "
                "no further part in this run"
            )
            self._event(f"round {server_round}: rejected the update from {name}: {reason}")
            self.excluded.add(name)
            return replace(row, status=REJECTED, reason=reason), None
        if status == STOPPED:
            self._event(
                f"round {server_round}: {name} stopped training: privacy budget spent "
                f"({row.reason})"
            )
            return row, None
        arrays = reply.message.content.array_records.get(ARRAYS)
        if arrays is not None:
            received = {
                key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in arrays.items()
            }
            row = replace(row, received=received, bytes_up=arrays.count_bytes())
        try:
            if status != TRAINED:
                raise StateError(
                    f"reply from {name} has status {status!r}, expected one of "
                    f"{[TRAINED, STOPPED, FAILED]}"
                )
            update = check_train_reply(
                reply.message, name, metrics, self.spec, self.arrays, self.settings.federation
            )
        except StateError as error:
            self._event(f"round {server_round}: rejected the update from {name}: {error}")
            return replace(row, status=REJECTED, reason=str(error)), None
        return replace(row, update_norm=update.norm), update

    def _recorded_steps(self, hospital: str) -> int:
        """The most DP steps this run has seen `hospital`'s ledger report: a ledger may never go
        below it."""
        return max(
            (h.steps for r in self.results.rounds for h in r.hospitals if h.name == hospital),
            default=0,
        )

    def _keep_updates(
        self, server_round: int, sent: dict[str, np.ndarray], accepted: list[CheckedUpdate]
    ) -> None:
        """Each accepted update as safetensors, for audit: exactly what left each hospital, and the
        global state it was trained from (SENT_STATE: no hospital name starts with '_')."""
        folder = updates_folder(self.settings.out, server_round)
        atomic_write_bytes(folder / SENT_STATE, save_safetensors(sent))
        for update in accepted:
            atomic_write_bytes(
                folder / f"{update.hospital}.safetensors", save_safetensors(dict(update.arrays))
            )

    def _evaluate_round(
        self, server_round: int, hospitals: list[HospitalRound]
    ) -> tuple[list[HospitalRound], Evaluation | None]:
        """The round's rows with each hospital's test scores added (a row for each hospital that
        only evaluated), and the pooled evaluation (None: no hospital's could be read)."""
        if self.settings.federation.secure_aggregation:
            return hospitals, self._secure_evaluation(server_round)
        sent = to_record(self.arrays)
        messages = [
            m
            for m in self.strategy.configure_evaluate(server_round, sent, ConfigRecord(), self.grid)
            if m.metadata.dst_node_id not in self.refused_nodes
        ]
        rows = {h.name: h for h in hospitals}
        evaluations = []
        for reply in self._exchange(server_round, "evaluation", messages):
            name = self._row_name(server_round, reply.node, reply.name)
            if reply.node in self.refused_nodes:
                # it claimed a name another node holds: its numbers are not that hospital's
                continue
            row = rows.get(name, HospitalRound(name=name, status="evaluated", node=str(reply.node)))
            row = replace(row, bytes_down=row.bytes_down + sent.count_bytes())
            if reply.status == FAILED:
                rows[name] = replace(row, reason=row.reason or reply.reason)
                continue
            try:
                evaluation = evaluation_from_reply(reply.message, self.settings.data.labels)
            except (KeyError, TypeError, ValueError) as error:
                unreadable = f"unreadable evaluation reply ({type(error).__name__}: {error})"
                rows[name] = replace(row, reason=row.reason or unreadable)
                continue
            rows[name] = replace(
                row,
                test_examples=evaluation.examples,
                accuracy=evaluation.accuracy,
                macro_f1=evaluation.macro_f1,
            )
            evaluations.append(evaluation)
        rows_by_name = sorted(rows.values(), key=lambda h: h.name)
        return rows_by_name, (pool(evaluations) if evaluations else None)

    def _secure_evaluation(self, server_round: int) -> Evaluation | None:
        """The federation's pooled test counts through SecAgg+: their sum, never one hospital's
        (whose own figures stay in its log). None when fewer than 3 hospitals, or fewer than the
        threshold, answer."""
        federation = self.settings.federation
        nodes = [node for node in self.grid.get_node_ids() if node not in self.refused_nodes]
        if len(nodes) < 3:
            self._event(
                f"round {server_round}: secure evaluation needs 3 hospitals, {len(nodes)} "
                "connected; skipped"
            )
            return None
        scale = float(federation.secagg_max_weight)
        config: dict[str, ConfigRecordValues] = {
            "server-round": server_round,
            PURPOSE: "evaluate",
            COUNTS_SCALE: scale,
        }
        result = secure_mean(
            self.grid,
            server_round,
            {node: (self.arrays, config) for node in nodes},
            max_weight=1,
            timeout=federation.round_timeout,
            names=(COUNTS,),
        )
        if result.mean is None:
            self._event(
                f"round {server_round}: the secure evaluation did not complete (too few hospitals "
                "answered)"
            )
            return None
        total = np.asarray(result.mean[COUNTS], dtype=np.float64) * len(result.reports) * scale
        return from_counts_vector(total, self.settings.data.labels)

    def _save(self, server_round: int) -> None:
        settings = self.settings
        directory = checkpoint_dir(settings.out, server_round)
        # before the checkpoint's meta.json marks it complete
        save_strategy_state(self.strategy, directory)
        save_checkpoint(
            directory,
            Checkpoint(
                arrays=self.arrays,
                labels=settings.data.labels,
                model=settings.model,
                backbone_name=self.backbone.name,
                backbone_hash=self.backbone.fingerprint,
                extra={
                    "round": server_round,
                    "rounds": settings.federation.rounds,
                    "config": settings.run_config,
                },
            ),
        )
        self.results.save(settings.out)


def run_federation(grid: Grid, settings: RunSettings) -> RunResults:
    return Federation(grid, settings).run()
