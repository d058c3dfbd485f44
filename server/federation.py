"""The round loop: send the global prompt and head, check and aggregate the replies, evaluate, save.

Written out rather than hidden in `Strategy.start`, because each round must also: keep only
replies that are exactly the exchanged state, drop hospitals whose budget is spent, record what
crossed the wire, checkpoint, and stop early once no hospital can train any more.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from rich.console import Console
from safetensors.numpy import save as save_safetensors

from medtune.backbone import Backbone, load_backbone, weights_hash
from medtune.checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from medtune.errors import CheckpointError, ConfigError, StateError
from medtune.files import atomic_write_bytes
from medtune.metrics import Evaluation, pool
from medtune.model import PromptClassifier
from medtune.results import HospitalRound, RoundRecord, RunResults, print_round
from medtune.settings import RunSettings
from medtune.state import ExchangedStateSpec
from medtune.wire import (
    ARRAYS,
    METRICS,
    STOPPED,
    TRAINED,
    epsilon_from_wire,
    evaluation_from_reply,
    from_record,
    hospital_of,
    to_record,
)
from server.strategy import build_strategy, restore_strategy_state, strategy_state

log = logging.getLogger("medtune.server")
STRATEGY_FILE = "strategy.safetensors"


def checkpoint_dir(out: Path, server_round: int) -> Path:
    return out / "checkpoints" / f"round_{server_round:03d}"


class Federation:
    """One run of the federation, from the seed or from a checkpoint."""

    def __init__(self, grid: Grid, settings: RunSettings, console: Console | None = None) -> None:
        self.grid = grid
        self.settings = settings
        self.console = console or Console()
        self.backbone: Backbone = load_backbone(settings.model.backbone, settings.model.num_layers)
        self.backbone_hash = weights_hash(self.backbone.encoder)
        self.strategy = build_strategy(settings.federation)
        labels = settings.data.labels
        self.spec = ExchangedStateSpec(settings.model.prompt_length, self.backbone.hidden_size, len(labels))
        self.stopped: set[int] = set()
        self.results = RunResults(config=settings.run_config)
        self.arrays, self.first_round = self._initial_state()

    def _initial_state(self) -> tuple[dict[str, np.ndarray], int]:
        settings = self.settings
        if settings.resume is None:
            model = PromptClassifier(self.backbone, settings.model, len(settings.data.labels), seed=settings.seed)
            return dict(model.exchanged_state()), 1
        path = find_checkpoint(settings.resume)
        if settings.out.resolve() not in path.resolve().parents:
            raise ConfigError(
                f"resume checkpoint {path} is not under this run's out directory {settings.out}; a resumed run "
                "must write where the original did, so each hospital's privacy ledger continues"
            )
        checkpoint = load_checkpoint(path)
        if checkpoint.backbone_hash != self.backbone_hash or checkpoint.labels != settings.data.labels:
            raise CheckpointError(
                f"{path}: made with backbone {checkpoint.backbone_name} (hash {checkpoint.backbone_hash[:12]}) and "
                f"labels {list(checkpoint.labels)}; this run has hash {self.backbone_hash[:12]} and labels "
                f"{list(settings.data.labels)}"
            )
        done = int(checkpoint.extra["round"])
        strategy_file = path / STRATEGY_FILE
        if strategy_file.is_file():
            from safetensors.numpy import load_file

            restore_strategy_state(self.strategy, load_file(str(strategy_file)))
        self.results = RunResults.load(settings.out, up_to_round=done)
        self.results.config = settings.run_config
        self._event(f"resumed from {path} after round {done}")
        return dict(checkpoint.arrays), done + 1

    def _event(self, text: str) -> None:
        self.results.events.append(text)
        self.console.print(f"[bold]{text}[/bold]")

    def _wait_for_hospitals(self) -> None:
        """Wait (up to round-timeout) for every expected hospital to connect before round 1's sampling."""
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
            hospitals, aggregated = self._train_round(server_round)
            if not any(h.status == TRAINED for h in hospitals) and hospitals:
                self._event(f"round {server_round}: every hospital's privacy budget is spent; stopping the run")
                break
            global_eval = self._evaluate_round(server_round, hospitals)
            record = RoundRecord(
                round=server_round,
                aggregated=aggregated,
                accuracy=global_eval.accuracy if global_eval else None,
                macro_f1=global_eval.macro_f1 if global_eval else None,
                loss=global_eval.loss if global_eval else None,
                worst_accuracy=min((h.accuracy for h in hospitals if h.accuracy is not None), default=None),
                wall_seconds=time.monotonic() - started,
                hospitals=hospitals,
            )
            self.results.rounds.append(record)
            self._save(server_round)
            print_round(record, rounds, self.console)
        self.results.save(settings.out)
        return self.results

    def _train_round(self, server_round: int) -> tuple[list[HospitalRound], bool]:
        federation = self.settings.federation
        sent = to_record(self.arrays)
        messages = [
            m
            for m in self.strategy.configure_train(server_round, sent, ConfigRecord(), self.grid)
            if m.metadata.dst_node_id not in self.stopped
        ]
        replies = list(self.grid.send_and_receive(messages, timeout=federation.round_timeout))
        hospitals: list[HospitalRound] = []
        trained: list[Message] = []
        for reply in replies:
            name, status, reason = hospital_of(reply)
            record = HospitalRound(name=name, status=status, reason=reason, bytes_down=sent.count_bytes())
            if not reply.has_error():
                self._read_train_metrics(reply, record)
                if status == TRAINED:
                    try:
                        self._check_update(reply, record)
                        trained.append(reply)
                    except StateError as error:
                        record.status, record.reason = "rejected", str(error)
                elif status == STOPPED:
                    self.stopped.add(reply.metadata.src_node_id)
                    self._event(f"round {server_round}: {name} stopped training: privacy budget spent ({reason})")
            hospitals.append(record)
        missing = len(messages) - len(replies)
        if missing:
            self._event(f"round {server_round}: {missing} hospital(s) did not reply within {federation.round_timeout} s")
        aggregated = len(trained) >= federation.min_hospitals
        if aggregated:
            new_arrays, _ = self.strategy.aggregate_train(server_round, trained)
            self.arrays = dict(self.spec.check(from_record(new_arrays), source=f"round {server_round} aggregate"))
        elif trained:
            self._event(
                f"round {server_round}: only {len(trained)} trained replies (< min-hospitals "
                f"{federation.min_hospitals}); keeping the previous global state"
            )
        if self.settings.run_config.get("keep-updates"):
            self._keep_updates(server_round, trained)
        return sorted(hospitals, key=lambda h: h.name), aggregated

    @staticmethod
    def _read_train_metrics(reply: Message, record: HospitalRound) -> None:
        metrics = reply.content.metric_records.get(METRICS)
        if metrics is None:
            return
        record.examples = int(metrics.get("num-examples", 0))
        record.train_loss = float(metrics.get("train-loss", 0.0))
        record.epsilon = epsilon_from_wire(float(metrics.get("epsilon", 0.0)))
        record.delta = float(metrics.get("delta", 0.0))
        record.steps = int(metrics.get("steps", 0))

    def _check_update(self, reply: Message, record: HospitalRound) -> None:
        """Only the exchanged state may come back: exact names, shapes, dtype, finite values."""
        content = reply.content
        if set(content.array_records) != {ARRAYS}:
            raise StateError(f"reply holds array records {sorted(content.array_records)}, expected ['{ARRAYS}']")
        record.received = {
            name: {"shape": list(array.shape), "dtype": str(array.dtype)} for name, array in content[ARRAYS].items()
        }
        record.bytes_up = content[ARRAYS].count_bytes()
        self.spec.check(from_record(content[ARRAYS]), source=f"update from {record.name}")
        if record.examples <= 0:
            raise StateError(f"update from {record.name} claims {record.examples} training examples")

    def _keep_updates(self, server_round: int, trained: list[Message]) -> None:
        """Each received update as safetensors, for audit: exactly what left each hospital."""
        folder = self.settings.out / "updates" / f"round_{server_round:03d}"
        for reply in trained:
            name = hospital_of(reply)[0]
            atomic_write_bytes(folder / f"{name}.safetensors", save_safetensors(from_record(reply.content[ARRAYS])))

    def _evaluate_round(self, server_round: int, hospitals: list[HospitalRound]) -> Evaluation | None:
        sent = to_record(self.arrays)
        messages = list(self.strategy.configure_evaluate(server_round, sent, ConfigRecord(), self.grid))
        replies = self.grid.send_and_receive(messages, timeout=self.settings.federation.round_timeout)
        by_name = {h.name: h for h in hospitals}
        evaluations = []
        for reply in replies:
            name, _, reason = hospital_of(reply)
            record = by_name.setdefault(name, HospitalRound(name=name, status="evaluated"))
            record.bytes_down += sent.count_bytes()
            if reply.has_error():
                record.reason = record.reason or reason
                continue
            evaluation = evaluation_from_reply(reply, self.settings.data.labels)
            record.test_examples = evaluation.examples
            record.accuracy, record.macro_f1 = evaluation.accuracy, evaluation.macro_f1
            evaluations.append(evaluation)
        hospitals[:] = sorted(by_name.values(), key=lambda h: h.name)
        return pool(evaluations) if evaluations else None

    def _save(self, server_round: int) -> None:
        settings = self.settings
        directory = checkpoint_dir(settings.out, server_round)
        save_checkpoint(
            directory,
            Checkpoint(
                arrays=self.arrays,
                labels=settings.data.labels,
                model=settings.model,
                backbone_name=self.backbone.name,
                backbone_hash=self.backbone_hash,
                extra={"round": server_round, "rounds": settings.federation.rounds, "config": settings.run_config},
            ),
        )
        moments = strategy_state(self.strategy)
        if moments:
            atomic_write_bytes(directory / STRATEGY_FILE, save_safetensors(moments))
        self.results.save(settings.out)


def run_federation(grid: Grid, settings: RunSettings) -> RunResults:
    return Federation(grid, settings).run()
