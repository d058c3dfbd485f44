"""The round loop: ask who can take part, send the global prompt and head, check and aggregate the
replies, evaluate, save.

Written out rather than hidden in `Strategy.start`, because each round must also: ask first, so
that no hospital spends budget on a round that cannot reach min-hospitals; send each hospital the
coordinator's record of its ledger (medtune/ledger_record.py); key hospitals by the node they
answer from, so two sites with one name never both count; reject replies that fail the update
checks (server.validation) and record why; record hospitals that failed (bad data file, corrupted
ledger) and go on with the others; drop hospitals whose budget is spent; record what crossed the
wire; checkpoint; and stop once no hospital can train any more.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from safetensors.numpy import save as save_safetensors

from medtune.backbone import Backbone, load_backbone
from medtune.checkpoint import (
    META_FILE,
    Checkpoint,
    check_resume_location,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from medtune.epsilon import EpsilonError, read_epsilon
from medtune.errors import CheckpointError, FederationError, StateError
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
    METRICS,
    READY,
    REJECTED,
    STOPPED,
    TRAINED,
    evaluation_from_reply,
    from_counts_vector,
    hospital_of,
    record_to_wire,
    scalar,
    to_record,
)
from medtune.files import atomic_write_bytes, json_ready
from medtune.label_prior import initial_model
from medtune.ledger_record import LedgerRecord, Spend
from medtune.metrics import Evaluation, pool
from medtune.run_config import RunSettings
from medtune.state import STATE_DTYPE, ExchangedStateSpec, update_norm
from medtune.stopping import recording
from server.strategy import (
    aggregate,
    build_strategy,
    restore_strategy_state,
    save_strategy_state,
    trimming_note,
)
from server.validation import CheckedUpdate, check_train_reply

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues

log = logging.getLogger("medtune.server")


RESUMABLE_KEYS = {
    "resume",
    "until-round",
    "rounds",
    "out",
}  # what a resumed run may set differently


def changed_settings(original: dict, now: dict) -> dict[str, tuple]:
    """Run-config keys whose value differs between the run's start and its resumption: {key: (then,
    now)}."""
    keys = (set(original) | set(now)) - RESUMABLE_KEYS
    # `original` was read back from JSON, where inf is "inf": compare both as they are written.
    return {
        key: (original.get(key), now.get(key))
        for key in sorted(keys)
        if json_ready(original.get(key)) != json_ready(now.get(key))
    }


def checkpoint_dir(out: Path, server_round: int) -> Path:
    return out / "checkpoints" / f"round_{server_round:03d}"


class Federation:
    """One run of the federation, from the seed or from a checkpoint."""

    def __init__(self, grid: Grid, settings: RunSettings, console: Console | None = None) -> None:
        self.grid = grid
        self.settings = settings
        self.console = console or Console()
        self.backbone: Backbone = load_backbone(settings.model.backbone, settings.model.num_layers)
        self.backbone_hash = self.backbone.fingerprint
        self.strategy = build_strategy(settings.federation, settings.train.learning_rate)
        labels = settings.data.labels
        self.spec = ExchangedStateSpec(
            settings.model.prompt_length, self.backbone.hidden_size, len(labels)
        )
        self.stopped: set[int] = set()  # nodes no longer sent training rounds
        self.excluded: set[str] = (
            set()
        )  # hospitals whose ledger went back: they spend without a true record
        self.claims: dict[int, str] = {}  # node id -> the hospital name it last answered with
        self.bindings: dict[
            str, int
        ] = {}  # hospital name -> the one node that is that hospital in this run
        self.refused_nodes: set[int] = (
            set()
        )  # nodes claiming a name bound to another connected node
        self.results = RunResults(config=settings.run_config)
        self.arrays, self.first_round = self._initial_state()
        for record in (
            self.results.rounds
        ):  # a resumed run keeps each hospital on the node it last trained from
            for row in record.hospitals:
                if row.node and row.status in (TRAINED, STOPPED):
                    self.bindings[row.name] = int(row.node)
        note = trimming_note(settings.federation, settings.source.hospitals)
        if note:
            self._event(note)

    def _initial_state(self) -> tuple[dict[str, np.ndarray], int]:
        settings = self.settings
        if settings.resume is None:
            model = initial_model(self.backbone, settings.model, settings.data, seed=settings.seed)
            return dict(model.exchanged_state()), 1
        path = find_checkpoint(settings.resume)
        check_resume_location(settings.out, path)
        checkpoint = load_checkpoint(path)
        try:
            done = int(checkpoint.extra["round"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path / META_FILE}: corrupted metadata (no round number)"
            ) from None
        if path.name != f"round_{done:03d}" or not 1 <= done <= settings.federation.rounds:
            raise CheckpointError(
                f"{path / META_FILE}: says round {done}, but the checkpoint is {path.name} of a "
                f"run of {settings.federation.rounds} rounds; the metadata was edited or copied "
                "from another run"
            )
        changed = changed_settings(dict(checkpoint.extra.get("config", {})), settings.run_config)
        if changed:
            raise CheckpointError(
                f"{path}: this run was started with other settings ({changed}); resume with the "
                "run's original --run-config (only rounds and until-round may change)"
            )
        if (
            checkpoint.backbone_hash != self.backbone_hash
            or checkpoint.labels != settings.data.labels
        ):
            raise CheckpointError(
                f"{path}: made with backbone {checkpoint.backbone_name} (hash "
                f"{checkpoint.backbone_hash[:12]}) and labels {list(checkpoint.labels)}; this run "
                f"has hash {self.backbone_hash[:12]} and labels {list(settings.data.labels)}"
            )
        restore_strategy_state(self.strategy, path)
        if not (settings.out / RESULTS_FILE).is_file():
            raise CheckpointError(
                f"{settings.out / RESULTS_FILE}: missing, so rounds 1..{done} of this run have no "
                "record; restore it to resume (a resumed run must continue the whole history, "
                f"never start it at round {done + 1})"
            )
        self.results = RunResults.load(settings.out, up_to_round=done)
        self.results.config = settings.run_config
        self._event(f"resumed from {path} after round {done}")
        return dict(checkpoint.arrays), done + 1

    def _event(self, text: str) -> None:
        self.results.events.append(text)
        self.console.print(f"[bold]{text}[/bold]")

    def _wait_for_hospitals(self) -> None:
        """Wait (up to round-timeout) for every expected hospital to connect before round 1's
        sampling."""
        expected = self.settings.source.hospitals
        deadline = time.monotonic() + self.settings.federation.round_timeout
        while len(list(self.grid.get_node_ids())) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        connected = len(list(self.grid.get_node_ids()))
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
            if (
                trained is None
            ):  # the hospitals that can still pay for a round are too few: the run is over
                break
            hospitals, accepted, aggregated = trained
            global_eval = self._evaluate_round(server_round, hospitals)
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
                if self.settings.federation.keep_updates:
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
        ready, hospitals = self._ask_ready(server_round, nodes, sent, config)
        if not self._enough_to_train(server_round, ready, hospitals):
            return None
        if federation.secure_aggregation:
            return self._secure_round(server_round, ready, hospitals, config)
        # Nodes refused for their name get the instruction too: its record tells them why, in their
        # own log.
        messages = [
            self._instruction(MessageType.TRAIN, node, sent, config)
            for node in ready + sorted(self.refused_nodes & set(nodes))
        ]
        accepted: list[CheckedUpdate] = []
        for reply, node, (name, status, reason) in self._exchange(
            server_round, "training", messages
        ):
            record = HospitalRound(
                name=self._row_name(server_round, node, name),
                status=status,
                reason=reason,
                bytes_down=sent.count_bytes(),
                node=str(node),
            )
            update = self._read_train_reply(server_round, reply, record, node)
            if update is not None:
                accepted.append(update)
            if record.status == STOPPED or name in self.excluded:
                self.stopped.add(node)
            hospitals.append(record)
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
        hospitals: list[HospitalRound],
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
        for node in ready:
            report = result.reports.get(node)
            name = self._row_name(
                server_round, node, str(report["hospital"]) if report else self._node_name(node)
            )
            record = HospitalRound(
                name=name,
                status=FAILED,
                node=str(node),
                bytes_down=result.bytes_down.get(node, 0),
                bytes_up=result.bytes_up.get(node, 0),
            )
            if report is None:
                record.reason = (
                    "dropped out of the secure aggregation round; the details are in the site's "
                    "own log"
                )
                self._event(f"round {server_round}: {name} failed: {record.reason}")
            else:
                record.status = TRAINED
                record.epsilon = read_epsilon(
                    report.get("epsilon", 0.0), f"secure report of {name}", spent=True
                )
                record.delta, record.steps = (
                    float(report.get("delta", 0.0)),
                    int(report.get("steps", 0)),
                )
            hospitals.append(record)
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
        answers: dict[int, tuple[str, str, str]] = {}
        asking = list(nodes)
        for _ in range(2):
            unknown = {node for node in asking if node not in self.claims}
            replies = self._exchange(
                server_round,
                "readiness",
                [self._instruction(MessageType.QUERY, node, sent, config) for node in asking],
            )
            for reply, node, (name, status, reason) in sorted(
                replies, key=lambda answer: answer[1]
            ):
                answers[node] = (
                    self._row_name(server_round, node, name),
                    status,
                    reason,
                )  # ties: lowest node id
            asking = [
                node
                for node in unknown
                if node in self.claims and answers.get(node, ("", ""))[1] == READY
            ]
            if not asking:
                break
        ready, absent = [], []
        for node in nodes:
            name, status, reason = answers.get(
                node, (self._node_name(node), FAILED, "no reply to the readiness query")
            )
            if status == READY and node not in self.refused_nodes:
                ready.append(node)
                continue
            if node in self.refused_nodes:
                continue  # recorded with its training reply
            absent.append(HospitalRound(name=name, status=status, reason=reason, node=str(node)))
            if status == STOPPED:
                self.stopped.add(node)
                self._event(f"round {server_round}: {name} stopped training: privacy budget spent")
                continue
            if status != FAILED:
                absent[-1].status, absent[-1].reason = (
                    FAILED,
                    f"answered {status!r} to the readiness query",
                )
            self._event(f"round {server_round}: {name} failed: {absent[-1].reason}")
        return ready, absent

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

    def _exchange(
        self, server_round: int, purpose: str, messages: list[Message]
    ) -> list[tuple[Message, int, tuple[str, str, str]]]:
        """Send, wait, and return each reply with the node it was sent to and its (name, status,
        reason).

        Replies are matched to the node they were sent to, never to their source: when a SuperNode
        dies mid-round the error reply comes from the SuperLink. Such a reply, and every node that
        did not answer in time, is named after the hospital last seen on that node.
        """
        timeout = self.settings.federation.round_timeout
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent_to = {
            m.metadata.message_id: m.metadata.dst_node_id for m in messages
        }  # ids are set on sending
        named = []
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            named.append((reply, node, hospital_of(reply, self._node_name(node))))
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        silent = sorted(self._node_name(n) for m, n in sent_to.items() if m not in answered)
        if silent:
            self._event(
                f"round {server_round}: no {purpose} reply within {timeout} s from "
                f"{', '.join(silent)}"
            )
        return named

    def _read_train_reply(
        self, server_round: int, reply: Message, record: HospitalRound, node: int
    ) -> CheckedUpdate | None:
        """Fill in `record` from one training reply; return its update only if every check
        passes."""
        name, status = record.name, record.status
        if status == FAILED:
            self._event(f"round {server_round}: {name} failed: {record.reason}")
            return None
        if node in self.refused_nodes:
            record.status, record.reason = (
                REJECTED,
                f"another node holds the name {self.claims[node]}",
            )
            return None
        self._read_train_metrics(reply, record)
        recorded = self._recorded_steps(name)
        if status == TRAINED and record.steps <= recorded:
            record.status = REJECTED
            record.reason = (
                f"its privacy ledger reports {record.steps} steps after training, but this run "
                f"recorded {recorded} before: the site's ledger was deleted or replaced; it takes "
                "no further part in this run"
            )
            self._event(f"round {server_round}: rejected the update from {name}: {record.reason}")
            self.excluded.add(name)
            return None
        if status == STOPPED:
            self._event(
                f"round {server_round}: {name} stopped training: privacy budget spent "
                f"({record.reason})"
            )
            return None
        arrays = reply.content.array_records.get(ARRAYS)
        if arrays is not None:
            record.received = {
                key: {"shape": list(a.shape), "dtype": str(a.dtype)} for key, a in arrays.items()
            }
            record.bytes_up = arrays.count_bytes()
        try:
            if status != TRAINED:
                raise StateError(
                    f"reply from {name} has status {status!r}, expected one of "
                    f"{[TRAINED, STOPPED, FAILED]}"
                )
            update = check_train_reply(
                reply, name, self.spec, self.arrays, self.settings.federation
            )
        except StateError as error:
            record.status, record.reason = REJECTED, str(error)
            self._event(f"round {server_round}: rejected the update from {name}: {error}")
            return None
        record.update_norm = update.norm
        return update

    def _recorded_steps(self, hospital: str) -> int:
        """The most DP steps this run has seen `hospital`'s ledger report: a ledger may never go
        below it."""
        return max(
            (h.steps for r in self.results.rounds for h in r.hospitals if h.name == hospital),
            default=0,
        )

    @staticmethod
    def _read_train_metrics(reply: Message, record: HospitalRound) -> None:
        """What the hospital reports, for the record; only numbers are kept (the checks judge
        them)."""
        metrics = reply.content.metric_records.get(METRICS)
        if metrics is None:
            return
        try:
            record.examples = int(scalar(metrics.get("num-examples", 0)))
            record.epsilon = read_epsilon(metrics.get("epsilon", 0.0), "", spent=True)
            record.delta = float(scalar(metrics.get("delta", 0.0)))
            record.steps = int(scalar(metrics.get("steps", 0)))
        except (TypeError, ValueError, OverflowError, EpsilonError):
            pass  # a malformed value: the update checks reject a trained reply and say why

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
    ) -> Evaluation | None:
        if self.settings.federation.secure_aggregation:
            return self._secure_evaluation(server_round)
        sent = to_record(self.arrays)
        messages = [
            m
            for m in self.strategy.configure_evaluate(server_round, sent, ConfigRecord(), self.grid)
            if m.metadata.dst_node_id not in self.refused_nodes
        ]
        by_name = {h.name: h for h in hospitals}
        evaluations = []
        for reply, node, (name, status, reason) in self._exchange(
            server_round, "evaluation", messages
        ):
            name = self._row_name(server_round, node, name)
            if node in self.refused_nodes:
                # it claimed a name another node holds: its numbers are not that hospital's
                continue
            record = by_name.setdefault(
                name, HospitalRound(name=name, status="evaluated", node=str(node))
            )
            record.bytes_down += sent.count_bytes()
            if status == FAILED:
                record.reason = record.reason or reason
                continue
            try:
                evaluation = evaluation_from_reply(reply, self.settings.data.labels)
            except (KeyError, TypeError, ValueError) as error:
                record.reason = (
                    record.reason
                    or f"unreadable evaluation reply ({type(error).__name__}: {error})"
                )
                continue
            record.test_examples = evaluation.examples
            record.accuracy, record.macro_f1 = evaluation.accuracy, evaluation.macro_f1
            evaluations.append(evaluation)
        hospitals[:] = sorted(by_name.values(), key=lambda h: h.name)
        return pool(evaluations) if evaluations else None

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
        save_strategy_state(
            self.strategy, directory
        )  # before the checkpoint's meta.json marks it complete
        save_checkpoint(
            directory,
            Checkpoint(
                arrays=self.arrays,
                labels=settings.data.labels,
                model=settings.model,
                backbone_name=self.backbone.name,
                backbone_hash=self.backbone_hash,
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
