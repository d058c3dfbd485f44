"""Replay the hostile-user catalogue against the `medtune` command line, as a new user would meet
it.

    python tests/hostile_catalogue.py            # all 54 cases (22 minutes on 2 cores, 2026-12-03)
    python tests/hostile_catalogue.py --quick    # the 42 that need no simulation (5 to 8 minutes)

Each case runs the real command in a subprocess, with a time limit, in a fresh folder, and is judged
on four counts: a raw traceback, a hang (the time limit passed), a silently wrong result (a run that
should have been refused succeeded, or a value was accepted), and lost data (a file that had to
survive changed or vanished, or a ledger that records fewer DP steps than were taken). The table
ends with the four counts; the exit status is 1 if any is not zero. Not part of `pytest`: the unit
tests cover each case in-process; this is the end-to-end replay of the catalogues of issues 14 and
22.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PYTHON = sys.executable
# A small but real federation: the embedded MiniLM cut to 2 layers, 40 notes per hospital.
SMALL_RUN = "num-layers=2 prompt-layer=1 max-length=32 records-per-hospital=40 rounds=3"
NOTES = (
    "text,label\n"
    + "chest pain radiating to the left arm,cardiology\nwheezing at night,pulmonology\n" * 6
)
# As many notes as NOTES (so the same sampling), other words: records a NOTES ledger was not made
# for.
OTHER_NOTES = (
    "text,label\n"
    + "crushing pain behind the sternum,cardiology\ndry cough for two weeks,pulmonology\n" * 6
)
# `medtune train` cut as small: the same 2-layer MiniLM, one pass.
SMALL_TRAIN = ("--num-layers", "2", "--prompt-layer", "1", "--max-length", "32", "--epochs", "1")


@dataclass
class Outcome:
    status: int | None  # None: killed at the time limit
    stderr: str
    seconds: float
    # its descendants when it was interrupted
    helpers: list[psutil.Process] = field(default_factory=list)


@dataclass
class Verdict:
    traceback: bool = False
    hang: bool = False
    wrong: str = ""  # what was silently wrong
    lost: str = ""  # what data was lost


def medtune(
    *args: str,
    cwd: Path,
    limit: float = 120.0,
    interrupt_after: Callable[[], bool] | None = None,
    interrupt: signal.Signals = signal.SIGINT,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run `medtune ARGS` (with `env` added to the environment); with `interrupt_after`, send
    `interrupt` once it returns True."""
    started = time.monotonic()
    helpers: list[psutil.Process] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [PYTHON, "-m", "medtune.cli", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if interrupt_after is not None:
        while (
            process.poll() is None and not interrupt_after() and time.monotonic() - started < limit
        ):
            time.sleep(0.5)
        if process.poll() is None:
            helpers = ray_helpers(process.pid)
            process.send_signal(interrupt)
            started = time.monotonic()  # from here on, the time limit is how long stopping takes
    try:
        _, stderr = process.communicate(timeout=limit)
        return Outcome(process.returncode, stderr, time.monotonic() - started, helpers)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return Outcome(None, stderr, time.monotonic() - started, helpers)


def succeeded(outcome: Outcome, what: str) -> Verdict:
    """The expected answer to input that must work: exit 0, no traceback."""
    verdict = Verdict(traceback="Traceback" in outcome.stderr, hang=outcome.status is None)
    if not verdict.hang and outcome.status != 0:
        verdict.wrong = f"{what}: exit {outcome.status}; stderr ends {outcome.stderr[-300:]!r}"
    return verdict


def worst(*verdicts: Verdict) -> Verdict:
    """One verdict for a case made of several commands: every problem of each."""
    total = Verdict()
    for verdict in verdicts:
        total.traceback |= verdict.traceback
        total.hang |= verdict.hang
        total.wrong = total.wrong or verdict.wrong
        total.lost = total.lost or verdict.lost
    return total


def refused(outcome: Outcome, message: str) -> Verdict:
    """The expected answer to bad input: exit 2, one `error:` line containing `message`, no
    traceback."""
    verdict = Verdict(traceback="Traceback" in outcome.stderr, hang=outcome.status is None)
    # argparse prefixes its own
    lines = [line for line in outcome.stderr.splitlines() if "error:" in line]
    if not verdict.hang and (outcome.status != 2 or not any(message in line for line in lines)):
        verdict.wrong = (
            f"exit {outcome.status}, expected 2 with {message!r}; stderr ends "
            f"{outcome.stderr[-200:]!r}"
        )
    return verdict


def ray_helpers(pid: int) -> list[psutil.Process]:
    """The Ray processes below `pid` now (the processes a stop must end)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ray" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def running(process: psutil.Process) -> bool:
    """Still running (a zombie has ended; it only waits for its parent to read its status)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def ledger_steps(out: Path) -> dict[str, int]:
    return {
        p.parent.name: json.loads(p.read_text())["steps"]
        for p in sorted(out.glob("sites/*/ledger.json"))
    }


def trained_rounds(out: Path) -> dict[str, list[int]]:
    return {
        p.parent.name: json.loads(p.read_text())["trained_rounds"]
        for p in sorted(out.glob("sites/*/ledger.json"))
    }


def ledger_digests(out: Path) -> dict[str, str]:
    """Every site ledger's bytes, readable or not."""
    return {p.parent.name: digest(p) for p in sorted(out.glob("sites/*/ledger.json"))}


def site_status(out: Path, hospital: str) -> dict[int, tuple[str, str]]:
    """Per round of results.json: `hospital`'s status and reason."""
    results = json.loads((out / "results.json").read_text())
    return {
        r["round"]: (h["status"], h.get("reason", ""))
        for r in results["rounds"]
        for h in r["hospitals"]
        if h["name"] == hospital
    }


def recorded_steps(out: Path) -> dict[str, int]:
    """The most steps results.json saw each hospital's ledger report."""
    results = json.loads((out / "results.json").read_text())
    steps: dict[str, int] = {}
    for record in results["rounds"]:
        for hospital in record["hospitals"]:
            steps[hospital["name"]] = max(
                steps.get(hospital["name"], 0), int(hospital.get("steps", 0))
            )
    return steps


# --- cases without a simulation -------------------------------------------------------------------


def quick_cases(work: Path) -> dict[str, Callable[[], Verdict]]:
    notes = work / "notes.csv"
    notes.write_text(NOTES, encoding="utf-8")

    def file_case(name: str, content: str, message: str, *extra: str) -> Callable[[], Verdict]:
        def case() -> Verdict:
            path = work / name
            path.write_text(content, encoding="utf-8")
            out = work / f"out-{name}"
            verdict = refused(
                medtune("train", "--data", str(path), "--out", str(out), *extra, cwd=work), message
            )
            if (out / "ledger.json").exists():
                verdict.wrong = verdict.wrong or "a ledger was written for refused data"
            return verdict

        return case

    def simulate_refused(run_config: str, message: str, *extra: str) -> Callable[[], Verdict]:
        def case() -> Verdict:
            out = work / f"sim-{abs(hash(run_config)) % 10**8}"
            verdict = refused(
                medtune(
                    "simulate", "--out", str(out), "--run-config", run_config, *extra, cwd=work
                ),
                message,
            )
            if (out / "results.json").exists():
                verdict.wrong = verdict.wrong or "a run started"
            return verdict

        return case

    def certs_twice() -> Verdict:
        out = work / "certificates"
        medtune("certs", "server", "--host", "localhost", "--out", str(out), cwd=work)
        key = digest(out / "server.key")
        verdict = refused(
            medtune("certs", "server", "--host", "localhost", "--out", str(out), cwd=work),
            "--rotate",
        )
        if digest(out / "server.key") != key:
            verdict.lost = "server.key was replaced"
        return verdict

    def folder_as_data() -> Verdict:
        folder = work / "folder.csv"
        folder.mkdir(exist_ok=True)
        return refused(
            medtune("train", "--data", str(folder), "--out", str(work / "o"), cwd=work),
            "is a directory",
        )

    def unwritable_out() -> Verdict:
        blocker = work / "a-file"
        blocker.write_text("", encoding="utf-8")
        return refused(
            medtune("train", "--data", str(notes), "--out", str(blocker / "run"), cwd=work),
            str(blocker),
        )

    def simulate_on_a_bad_row() -> Verdict:
        path = work / "sim-bad-row.csv"
        path.write_text(NOTES + "fever for three days,cardio\n", encoding="utf-8")
        return simulate_refused(f'data-source="{path}" hospitals=2', "row 13: label 'cardio'")()

    def one_label_only() -> Verdict:
        path = work / "one-label.csv"
        path.write_text(
            "text,label\n" + "".join(f"chest pain {i},cardiology\n" for i in range(12)),
            encoding="utf-8",
        )
        run = work / "one-label-run"
        outcome = medtune(
            "train",
            "--data",
            str(path),
            "--out",
            str(run),
            "--num-layers",
            "2",
            "--prompt-layer",
            "1",
            "--max-length",
            "32",
            "--epochs",
            "1",
            cwd=work,
        )
        verdict = Verdict(traceback="Traceback" in outcome.stderr, hang=outcome.status is None)
        if outcome.status != 0 or "of 1 label(s)" not in outcome.stderr:
            verdict.wrong = (
                f"exit {outcome.status} without the one-label warning; stderr ends "
                f"{outcome.stderr[-200:]!r}"
            )
        return verdict

    def audit_a_train_directory() -> Verdict:
        one_label_run = work / "one-label-run"
        if not one_label_run.exists():
            one_label_only()
        return refused(
            medtune("audit", "--run", str(one_label_run), "--hospital", "hospital_1", cwd=work),
            "a `medtune train` run",
        )

    def train(
        out: Path, *extra: str, data: Path = notes, env: dict[str, str] | None = None
    ) -> Outcome:
        return medtune(
            "train", "--data", str(data), "--out", str(out), *SMALL_TRAIN, *extra, cwd=work, env=env
        )

    first_run = work / "l1"

    def trained_once() -> Verdict:
        """`medtune train --out l1`, run once: the base of the cases that need a finished local
        run."""
        if (first_run / "ledger.json").exists() and (
            first_run / "checkpoint" / "meta.json"
        ).exists():
            return Verdict()
        return succeeded(train(first_run), "the first `medtune train --out l1`")

    def other_ledger_keeps_out_ledger() -> Verdict:
        verdict = trained_once()
        if verdict.wrong or verdict.hang:
            return verdict
        kept = digest(first_run / "ledger.json")
        other = work / "other.json"
        verdict = worst(
            verdict,
            succeeded(train(first_run, "--ledger", str(other)), "train --ledger other.json"),
        )
        if digest(first_run / "ledger.json") != kept:
            verdict.lost = "l1/ledger.json changed although --ledger named other.json"
        elif not other.is_file() or json.loads(other.read_text()).get("steps", 0) < 1:
            verdict.wrong = verdict.wrong or "other.json holds no ledger of the new run's steps"
        return verdict

    def ledger_of_other_records() -> Verdict:
        first = work / "records-a"
        made = succeeded(train(first), "the first run")
        if made.wrong or made.hang:
            return made
        ledger = first / "ledger.json"
        kept = digest(ledger)
        other_notes = work / "other-notes.csv"
        other_notes.write_text(OTHER_NOTES, encoding="utf-8")
        verdict = worst(
            made,
            refused(
                train(work / "records-b", "--ledger", str(ledger), data=other_notes),
                "was made for other records",
            ),
        )
        if digest(ledger) != kept:
            verdict.lost = "the refused run changed the other records' ledger"
        return verdict

    def number_case(flag: str, value: str, message: str) -> Callable[[], Verdict]:
        def case() -> Verdict:
            out = work / f"out-number-{flag.strip('-')}-{len(value)}"
            verdict = refused(
                medtune(
                    "train",
                    "--data",
                    str(notes),
                    "--out",
                    str(out),
                    *SMALL_TRAIN,
                    flag,
                    value,
                    cwd=work,
                ),
                message,
            )
            if out.exists():
                verdict.wrong = verdict.wrong or f"{out} was made for a refused run"
            return verdict

        return case

    def simulate_refused_early(run_config: str, message: str) -> Callable[[], Verdict]:
        """Refused in one line before Flower starts: no Ray worker, not even the out directory."""

        def case() -> Verdict:
            out = work / f"sim-early-{abs(hash(run_config)) % 10**8}"
            outcome = medtune("simulate", "--out", str(out), "--run-config", run_config, cwd=work)
            verdict = refused(outcome, message)
            if out.exists() or "ClientAppActor" in outcome.stderr:
                verdict.wrong = (
                    verdict.wrong or f"the run got past its checks ({out} made or a worker started)"
                )
            return verdict

        return case

    def remembered_noise(value: object) -> Callable[[], Verdict]:
        """A memo of noise searches whose every value was replaced by `value`: searched again, same
        sigma."""

        def case() -> Verdict:
            tag = hashlib.sha256(repr(value).encode()).hexdigest()[:8]
            cache = work / f"xdg-cache-{tag}"
            env = {"XDG_CACHE_HOME": str(cache)}
            first = work / f"memo-first-{tag}"
            verdict = succeeded(train(first, env=env), "the first run")
            memo = cache / "medtune" / "noise-multipliers.json"
            if verdict.wrong or verdict.hang or not memo.is_file():
                verdict.wrong = verdict.wrong or f"the first run wrote no {memo}"
                return verdict
            sigma = json.loads((first / "ledger.json").read_text())["noise_multiplier"]
            truth = json.loads(memo.read_text())
            memo.write_text(json.dumps({key: value for key in truth}), encoding="utf-8")
            second = work / f"memo-second-{tag}"
            verdict = succeeded(train(second, env=env), f"a run on a memo of {value!r}")
            if verdict.wrong or verdict.hang:
                return verdict
            again = json.loads((second / "ledger.json").read_text())["noise_multiplier"]
            if again != sigma:
                verdict.wrong = (
                    f"with every remembered value {value!r}: noise multiplier "
                    f"{again}, the first run's {sigma}"
                )
            elif json.loads(memo.read_text()) != truth:
                verdict.wrong = (
                    f"the memo was not searched again: it holds {memo.read_text()[:200]!r}"
                )
            return verdict

        return case

    def reversed_checkpoint_labels() -> Verdict:
        verdict = trained_once()
        if verdict.wrong or verdict.hang:
            return verdict
        edited = work / "reversed-checkpoint"
        shutil.copytree(first_run / "checkpoint", edited, dirs_exist_ok=True)
        meta = json.loads((edited / "meta.json").read_text())
        meta["labels"] = list(reversed(meta["labels"]))
        (edited / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        return refused(
            medtune("predict", "--checkpoint", str(edited), "--text", "chest pain", cwd=work),
            "differ from",
        )

    def edited_feature_cache() -> Verdict:
        import numpy as np

        out = work / "edited-cache"
        verdict = succeeded(train(out), "the first run")
        caches = sorted(out.glob("features/*/offsets.npy"))
        if verdict.wrong or verdict.hang or not caches:
            verdict.wrong = verdict.wrong or f"no feature cache under {out / 'features'}"
            return verdict
        originals = {path: path.read_bytes() for path in caches}
        for path in caches:  # one record boundary moved by a token: loadable, same length, same end
            offsets = np.load(path)
            offsets[1] += 1
            np.save(path, offsets)
        again = train(out, "--ledger", str(work / "edited-cache-ledger.json"))
        verdict = succeeded(again, "the run on an edited cache")
        if not verdict.wrong and not (
            "offsets.npy does not match its recorded checksum" in again.stderr
            and "rebuilding it" in again.stderr
        ):
            verdict.wrong = (
                f"no rebuild of the edited cache was logged; stderr ends {again.stderr[-300:]!r}"
            )
        elif not verdict.wrong and any(
            path.read_bytes() != kept for path, kept in originals.items()
        ):
            verdict.wrong = "an edited offsets.npy is still in the cache"
        return verdict

    def sweep_axis_out_of_range() -> Verdict:
        path = work / "hostile-sweep.toml"
        path.write_text(
            'name = "hostile"\nscenario = "default"\nepsilons = [8.0]\nseeds = [0]\n\n'
            "[run-config]\n"
            "num-layers = 2\nprompt-layer = 1\nmax-length = 32\nrecords-per-hospital = 40\n"
            "hospitals = 2\nrounds = 1\n\n"
            "[axes]\nprompt-layer = [1, 9]\n",
            encoding="utf-8",
        )
        out = work / "sweep-out"
        outcome = medtune("benchmark", "sweep", "--sweep", str(path), "--out", str(out), cwd=work)
        verdict = refused(outcome, "is outside 0..")
        if not verdict.wrong and "prompt-layer-9" not in outcome.stderr:
            verdict.wrong = (
                f"the refusal names no cell of prompt-layer 9: {outcome.stderr[-200:]!r}"
            )
        if out.exists():
            verdict.wrong = verdict.wrong or f"{out} was made: a cell ran or was prepared"
        return verdict

    def audit_out_under_a_file() -> Verdict:
        blocker = work / "a-file"
        blocker.write_text("", encoding="utf-8")
        # --run names nothing: a refusal that names the run instead came after the audit started
        return refused(
            medtune(
                "audit",
                "--run",
                str(work / "no-such-run"),
                "--hospital",
                "hospital_1",
                "--out",
                str(blocker / "audit.json"),
                cwd=work,
            ),
            "cannot be written",
        )

    def prompt_too_long() -> Verdict:
        out = work / "long-prompt"
        verdict = refused(train(out, "--prompt-length", "600"), "exceeds the")
        if (out / "features").exists():
            verdict.wrong = verdict.wrong or "a feature cache folder was made before the refusal"
        return verdict

    def long_note() -> Verdict:
        path = work / "long-note.csv"
        # 215 KiB
        path.write_text(NOTES + '"' + "chest pain " * 20_000 + '",cardiology\n', encoding="utf-8")
        out = work / "long-note"
        verdict = succeeded(train(out, data=path), "a note over 128 KiB")
        if not verdict.wrong and not verdict.hang:
            metrics = json.loads((out / "metrics.json").read_text())
            read = metrics["train"]["examples"] + metrics["test"]["examples"]
            if read != 13:
                verdict.wrong = f"{read} of 13 records were trained or tested on"
        return verdict

    return {
        "train: one label only (trains, with a warning)": one_label_only,
        "audit on a `medtune train` directory": audit_a_train_directory,
        "train: label not in the list": file_case(
            "bad-label.csv", "text,label\nchest pain,cardio\n", "label 'cardio'"
        ),
        "train: duplicated header column": file_case(
            "dup.csv", "text,label,text\na,cardiology,b\n", "appear more than once"
        ),
        "train: number as JSONL text": file_case(
            "num.jsonl", '{"text": 12345, "label": "cardiology"}\n', "not a string"
        ),
        "train: empty file": file_case("empty.csv", "", "file is empty"),
        "train: empty label name": file_case(
            "ok.csv", NOTES, "empty label name", "--labels", "a,,b"
        ),
        "train: a folder as --data": folder_as_data,
        "train: --device cuda without CUDA": file_case(
            "ok2.csv", NOTES, "CUDA", "--device", "cuda"
        ),
        "train: --out under a file": unwritable_out,
        "predict: empty --text": lambda: refused(
            medtune("predict", "--checkpoint", str(work), "--text", "", cwd=work), "is empty"
        ),
        "simulate: run-config token without '='": simulate_refused(
            "epsilon 1.0 hospitals=2", "is not key=value"
        ),
        "simulate: epsilon=-inf": simulate_refused("epsilon=-inf", "must be positive"),
        "simulate: min-hospitals > hospitals": simulate_refused(
            "min-hospitals=4 hospitals=3", "no round could ever aggregate"
        ),
        "simulate: cpus-per-hospital 0": simulate_refused(
            "rounds=1", "cpus-per-hospital must be positive", "--cpus-per-hospital", "0"
        ),
        "simulate: a data file with a bad row": simulate_on_a_bad_row,
        "simulate: labels the data lacks": simulate_refused(
            'labels="a,b"', "missing from the run's label list"
        ),
        "simulate: records-per-hospital=0": simulate_refused(
            "records-per-hospital=0", "must be at least 20"
        ),
        "simulate: until-round=-1": simulate_refused("until-round=-1", "until-round must be 0"),
        "simulate: prompt layer past the backbone": simulate_refused(
            "prompt-layer=9", "is outside 0..6"
        ),
        "certs server run twice": certs_twice,
        "certs node: name with spaces": lambda: refused(
            medtune(
                "certs", "node", "--hospital", "st mary", "--out", str(work / "keys"), cwd=work
            ),
            "use 1-64 letters",
        ),
        "audit without --hospital": lambda: refused(
            medtune("audit", "--run", str(work), cwd=work), "--hospital"
        ),
        # issue 22
        "train --ledger other.json after train --out l1: l1's ledger kept": (
            other_ledger_keeps_out_ledger
        ),
        "train: a ledger made for other records": ledger_of_other_records,
        "train: --seed -1": number_case("--seed", "-1", "train.seed must be a whole number"),
        "train: --seed 99999999999999999999999": number_case(
            "--seed", "99999999999999999999999", "train.seed must be a whole number"
        ),
        "simulate: dirichlet-alpha=nan": simulate_refused_early(
            "dirichlet-alpha=nan", "must be a finite number"
        ),
        "simulate: dirichlet-alpha=inf": simulate_refused_early(
            "dirichlet-alpha=inf", "must be a finite number"
        ),
        "simulate: proximal-mu=nan with fedprox": simulate_refused_early(
            'strategy="fedprox" proximal-mu=nan', "must be a finite number"
        ),
        "simulate: round-timeout=nan": simulate_refused_early(
            "round-timeout=nan", "must be a finite number"
        ),
        "simulate: epsilon=1.0 epsilon=50.0": simulate_refused_early(
            "epsilon=1.0 epsilon=50.0", "is given twice"
        ),
        "simulate: gpus-per-hospital=0.5 without a GPU": simulate_refused_early(
            "gpus-per-hospital=0.5", "has no CUDA GPU"
        ),
        "train: remembered noise multipliers all 1e6": remembered_noise(1e6),
        "train: remembered noise multipliers all 'Infinity'": remembered_noise("Infinity"),
        "train: remembered noise multipliers all 1e300": remembered_noise(1e300),
        "predict: checkpoint meta.json labels reversed": reversed_checkpoint_labels,
        "train: feature cache offsets.npy edited": edited_feature_cache,
        "benchmark sweep: an axis value out of range": sweep_axis_out_of_range,
        "audit: --out under a file": audit_out_under_a_file,
        "train: --prompt-length 600": prompt_too_long,
        "train: a note over 128 KiB": long_note,
    }


# --- cases on a real simulation -------------------------------------------------------------------


def run_cases(work: Path) -> dict[str, Callable[[], Verdict]]:
    def simulate(out: Path, *extra: str, settings: str = "", **kw) -> Outcome:
        run_config = f"{SMALL_RUN} {settings}".strip()
        return medtune(
            "simulate",
            "--out",
            str(out),
            "--run-config",
            run_config,
            *extra,
            cwd=work,
            limit=600,
            **kw,
        )

    finished = work / "finished"
    straight: dict[str, int] = {}

    def straight_steps() -> dict[str, int]:
        """Each site's ledger steps after a straight run of SMALL_RUN (the finished run, made
        once)."""
        if not straight:
            if not (finished / "results.json").exists():
                simulate(finished)
            straight.update(ledger_steps(finished))
        return straight

    def rerun_without_resume() -> Verdict:
        first = simulate(finished)
        if first.status != 0:
            return Verdict(
                traceback="Traceback" in first.stderr,
                wrong=f"the first run failed: {first.stderr[-300:]!r}",
            )
        before = digest(finished / "results.json")
        verdict = refused(simulate(finished), "already holds a run")
        if digest(finished / "results.json") != before:
            verdict.lost = "results.json was overwritten"
        return verdict

    def two_runs_at_once() -> Verdict:
        out = work / "shared-out"
        first = subprocess.Popen(
            [PYTHON, "-m", "medtune.cli", "simulate", "--out", str(out), "--run-config", SMALL_RUN],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        verdict = refused(simulate(out), "is in use by pid")
        _, stderr = first.communicate(timeout=600)
        if first.returncode != 0:
            verdict.wrong = verdict.wrong or f"the first run failed: {stderr[-300:]!r}"
        elif ledger_steps(out) != recorded_steps(out):
            verdict.lost = f"ledgers {ledger_steps(out)} against recorded {recorded_steps(out)}"
        return verdict

    def stopped_in_round_2_then_resumed(
        name: str, interrupt: signal.Signals
    ) -> Callable[[], Verdict]:
        """A stop during round 2: within seconds, nothing of round 2 recorded, no Ray process left,
        and --resume finishes every round, each ledger counting exactly a straight run's steps (a
        stop costs nothing: the round it cut short is not charged twice)."""

        def case() -> Verdict:
            out = work / name
            stopped = simulate(
                out,
                interrupt=interrupt,
                interrupt_after=lambda: (out / "checkpoints" / "round_001" / "meta.json").exists(),
            )
            verdict = Verdict(
                traceback="Traceback" in stopped.stderr,
                hang=stopped.status is None or stopped.seconds > 20,
            )
            if interrupt == signal.SIGKILL:
                expected_status, expected_line = -signal.SIGKILL, ""
            else:
                expected_status, expected_line = 130, f"interrupted: stopped by {interrupt.name}"
            if stopped.status != expected_status or expected_line not in stopped.stderr:
                verdict.wrong = (
                    f"{interrupt.name}: exit {stopped.status}, stderr ends "
                    f"{stopped.stderr[-200:]!r}"
                )
            rounds = [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]]
            if rounds != list(range(1, len(rounds) + 1)) or any(
                not (out / "checkpoints" / f"round_{r:03d}" / "meta.json").exists() for r in rounds
            ):
                verdict.wrong = (
                    verdict.wrong or f"recorded rounds {rounds} do not match the checkpoints"
                )
            time.sleep(3)
            mine = sorted(p.pid for p in stopped.helpers if running(p))
            if not stopped.helpers:
                verdict.wrong = verdict.wrong or "no Ray process was seen before the stop"
            elif mine:
                verdict.wrong = (
                    verdict.wrong or f"Ray processes {mine} outlived the {interrupt.name} by 3 s"
                )
            resumed = simulate(out, "--resume", str(out))
            verdict.traceback |= "Traceback" in resumed.stderr
            verdict.hang |= resumed.status is None
            final = [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]]
            if resumed.status != 0 or final != [1, 2, 3]:
                verdict.lost = (
                    f"after --resume: exit {resumed.status}, rounds {final}; stderr "
                    f"ends {resumed.stderr[-300:]!r}"
                )
            elif any(ledger_steps(out)[h] < s for h, s in recorded_steps(out).items()):
                verdict.lost = f"ledgers {ledger_steps(out)} below recorded {recorded_steps(out)}"
            elif ledger_steps(out) != straight_steps():
                verdict.wrong = verdict.wrong or (
                    f"after the stop and --resume the ledgers count {ledger_steps(out)} steps; a "
                    f"straight run's count {straight_steps()}"
                )
            return verdict

        return case

    def deleted_ledger_on_resume() -> Verdict:
        out = work / "deleted-ledger"
        simulate(out, settings="until-round=1")
        (out / "sites" / "hospital_1" / "ledger.json").unlink()
        resumed = simulate(out, "--resume", str(out))
        verdict = Verdict(traceback="Traceback" in resumed.stderr, hang=resumed.status is None)
        if (out / "sites" / "hospital_1" / "ledger.json").exists():
            verdict.lost = "a fresh ledger replaced the deleted one"
        return verdict

    def refused_site_on_resume(
        name: str,
        edit: Callable[[Path], None],
        hospital: str,
        message: str,
    ) -> Callable[[], Verdict]:
        """After round 1, `edit` a site's files; the resume refuses `hospital` every later round
        (its log saying `message`), leaves its ledger as it is, and the other hospitals train every
        round."""

        def case() -> Verdict:
            out = work / name
            first = simulate(out, settings="until-round=1")
            if first.status != 0:
                return Verdict(
                    traceback="Traceback" in first.stderr,
                    hang=first.status is None,
                    wrong=f"round 1 failed: {first.stderr[-300:]!r}",
                )
            edit(out / "sites" / hospital)
            ledger = out / "sites" / hospital / "ledger.json"
            kept = digest(ledger)
            resumed = simulate(out, "--resume", str(out))
            verdict = succeeded(resumed, "the resume")
            if verdict.hang:
                return verdict
            final = [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]]
            refusals = {r: status for r, status in site_status(out, hospital).items() if r > 1}
            others = {
                h: site_status(out, h)
                for h in ("hospital_1", "hospital_2", "hospital_3")
                if h != hospital
            }
            if digest(ledger) != kept:
                verdict.lost = f"{hospital}'s ledger changed ({kept[:12]} -> {digest(ledger)[:12]})"
            elif final != [1, 2, 3]:
                verdict.wrong = verdict.wrong or f"rounds {final} after --resume"
            elif sorted(refusals) != [2, 3] or any(
                status != "failed" or not reason.startswith("privacy ledger refused")
                for status, reason in refusals.values()
            ):
                verdict.wrong = verdict.wrong or f"{hospital} in rounds 2-3: {refusals}"
            elif message not in resumed.stderr:
                verdict.wrong = verdict.wrong or f"no site log line says {message!r}"
            elif any(
                status != "trained" for rounds in others.values() for status, _ in rounds.values()
            ):
                verdict.wrong = (
                    verdict.wrong or f"the other hospitals did not train every round: {others}"
                )
            elif hospital in trained_rounds(out) and trained_rounds(out)[hospital] != [1]:
                verdict.wrong = (
                    verdict.wrong or f"{hospital} trained rounds {trained_rounds(out)[hospital]}"
                )
            return verdict

        return case

    def wipe(site: Path) -> None:
        (site / "ledger.json").unlink()
        (site / "ledger.optimizer.safetensors").unlink()

    def claim_little_noise(recompute_checksum: bool) -> Callable[[Path], None]:
        def edit(site: Path) -> None:
            state = json.loads((site / "ledger.json").read_text())
            for entry in state["history"]:
                # noise multiplier 1000: the history now claims almost no epsilon spent
                entry[0] = 1000.0
            if recompute_checksum:
                from medtune.privacy import ledger_checksum

                state["checksum"] = ledger_checksum(state)
            (site / "ledger.json").write_text(json.dumps(state, indent=2), encoding="utf-8")

        return edit

    def sites_ledger_to_train() -> Verdict:
        straight_steps()  # the finished run
        ledger = finished / "sites" / "hospital_1" / "ledger.json"
        kept = digest(ledger)
        notes = work / "notes-for-a-site-ledger.csv"
        notes.write_text(NOTES, encoding="utf-8")
        verdict = refused(
            medtune(
                "train",
                "--data",
                str(notes),
                "--out",
                str(work / "local-on-site-ledger"),
                *SMALL_TRAIN,
                "--ledger",
                str(ledger),
                cwd=work,
            ),
            "is the privacy ledger of hospital 'hospital_1', not of 'local'",
        )
        if digest(ledger) != kept:
            verdict.lost = "the refused `medtune train` changed hospital_1's ledger"
        return verdict

    def too_few_ready_hospitals() -> Verdict:
        out = work / "min-hospitals-3"
        first = simulate(out, settings="min-hospitals=3 until-round=1")
        if first.status != 0:
            return Verdict(
                traceback="Traceback" in first.stderr,
                hang=first.status is None,
                wrong=f"round 1 failed: {first.stderr[-300:]!r}",
            )
        (out / "sites" / "hospital_3" / "ledger.json").write_text("garbage{{", encoding="utf-8")
        before = ledger_digests(out)
        stopped = simulate(out, "--resume", str(out), settings="min-hospitals=3")
        verdict = Verdict(traceback="Traceback" in stopped.stderr, hang=stopped.status is None)
        lines = [line for line in stopped.stderr.splitlines() if "error:" in line]
        if not verdict.hang and (
            stopped.status in (0, None)
            or len(lines) != 1
            or "hospital_3" not in lines[0]
            or "privacy ledger refused" not in lines[0]
        ):
            verdict.wrong = (
                f"exit {stopped.status}, error lines {lines}; stderr ends {stopped.stderr[-200:]!r}"
            )
        if ledger_digests(out) != before:
            verdict.lost = "a ledger changed although no round could aggregate"
        return verdict

    def resume_edge_cases() -> Verdict:
        verdict = refused(
            simulate(work / "fresh", "--resume", str(finished)),
            "is not under this run's out directory",
        )
        if (work / "fresh").exists():
            verdict.wrong = verdict.wrong or "a refused resume left an empty folder"
        other = refused(
            simulate(finished, "--resume", str(finished), settings="learning-rate=0.5"),
            "other settings",
        )
        meta = finished / "checkpoints" / "round_001" / "meta.json"
        saved = meta.read_text()
        meta.write_text(saved.replace('"round": 1', '"round": 99'))
        edited = refused(simulate(finished, "--resume", str(meta.parent)), "says round 99")
        meta.write_text(saved)
        results = finished / "results.json"
        kept = results.read_bytes()
        results.unlink()
        gone = refused(simulate(finished, "--resume", str(finished)), "results.json: missing")
        results.write_bytes(kept)
        for extra in (other, edited, gone):
            verdict.traceback |= extra.traceback
            verdict.hang |= extra.hang
            verdict.wrong = verdict.wrong or extra.wrong
        return verdict

    return {
        "re-run into a finished out without --resume": rerun_without_resume,
        "two runs into one out at once": two_runs_at_once,
        "Ctrl-C in round 2, then --resume": stopped_in_round_2_then_resumed(
            "interrupted", signal.SIGINT
        ),
        "SIGTERM in round 2, then --resume": stopped_in_round_2_then_resumed(
            "terminated", signal.SIGTERM
        ),
        "SIGKILL in round 2, then --resume": stopped_in_round_2_then_resumed(
            "killed", signal.SIGKILL
        ),
        "resume after a ledger was deleted": deleted_ledger_on_resume,
        # issue 22
        "resume after a site folder was wiped (ledger and optimizer state)": refused_site_on_resume(
            "wiped-site", wipe, "hospital_2", "privacy ledger missing, but the coordinator records"
        ),
        "resume after a ledger history claimed noise 1000 (checksum left)": refused_site_on_resume(
            "little-noise", claim_little_noise(False), "hospital_1", "damaged privacy ledger"
        ),
        "resume after a ledger history claimed noise 1000 (checksum recomputed)": (
            refused_site_on_resume(
                "little-noise-resealed",
                claim_little_noise(True),
                "hospital_1",
                "privacy ledger's history gives epsilon=",
            )
        ),
        "train --ledger <a simulated site's ledger>": sites_ledger_to_train,
        "min-hospitals=3, one ledger unreadable: stop, no ledger charged": too_few_ready_hospitals,
        "resume: outside out, other settings, edited round, lost results.json": resume_edge_cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="only the cases that need no simulation"
    )
    args = parser.parse_args()
    counts = {"tracebacks": 0, "hangs": 0, "silent wrong results": 0, "data lost": 0}
    with tempfile.TemporaryDirectory(prefix="medtune-hostile-") as folder:
        work = Path(folder)
        cases = quick_cases(work) | ({} if args.quick else run_cases(work))
        for name, case in cases.items():
            started = time.monotonic()
            verdict = case()
            counts["tracebacks"] += verdict.traceback
            counts["hangs"] += verdict.hang
            counts["silent wrong results"] += bool(verdict.wrong)
            counts["data lost"] += bool(verdict.lost)
            problems = [
                t for t, bad in (("traceback", verdict.traceback), ("hang", verdict.hang)) if bad
            ]
            problems += [f"wrong: {verdict.wrong}"] if verdict.wrong else []
            problems += [f"lost: {verdict.lost}"] if verdict.lost else []
            print(
                f"{'ok  ' if not problems else 'FAIL'} {name} ({time.monotonic() - started:.0f} s)"
                + "".join(f"\n       {p}" for p in problems),
                flush=True,
            )
    print(
        f"\n{len(cases)} cases: " + ", ".join(f"{count} {what}" for what, count in counts.items())
    )
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
