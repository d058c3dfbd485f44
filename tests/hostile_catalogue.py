"""Replay the hostile-user catalogue against the `medtune` command line, as a new user would meet it.

    python tests/hostile_catalogue.py            # every case (about 6 minutes on 2 cores)
    python tests/hostile_catalogue.py --quick    # the cases that need no simulation (under a minute)

Each case runs the real command in a subprocess, with a time limit, in a fresh folder, and is judged
on four counts: a raw traceback, a hang (the time limit passed), a silently wrong result (a run that
should have been refused succeeded, or a value was accepted), and lost data (a file that had to
survive changed or vanished, or a ledger that records fewer DP steps than were taken). The table
ends with the four counts; the exit status is 1 if any is not zero. Not part of `pytest`: the unit
tests cover each case in-process; this is the end-to-end replay of issue 14's catalogue.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
NOTES = "text,label\n" + "chest pain radiating to the left arm,cardiology\nwheezing at night,pulmonology\n" * 6


@dataclass
class Outcome:
    status: int | None  # None: killed at the time limit
    stderr: str
    seconds: float
    helpers: list[psutil.Process] = field(default_factory=list)  # its descendants when it was interrupted


@dataclass
class Verdict:
    traceback: bool = False
    hang: bool = False
    wrong: str = ""  # what was silently wrong
    lost: str = ""  # what data was lost


def medtune(
    *args: str, cwd: Path, limit: float = 120.0, interrupt_after: Callable[[], bool] | None = None,
    interrupt: signal.Signals = signal.SIGINT,
) -> Outcome:
    """Run `medtune ARGS`; with `interrupt_after`, send `interrupt` once it returns True."""
    started = time.monotonic()
    helpers: list[psutil.Process] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [PYTHON, "-m", "medtune.cli", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    if interrupt_after is not None:
        while process.poll() is None and not interrupt_after() and time.monotonic() - started < limit:
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


def refused(outcome: Outcome, message: str) -> Verdict:
    """The expected answer to bad input: exit 2, one `error:` line containing `message`, no traceback."""
    verdict = Verdict(traceback="Traceback" in outcome.stderr, hang=outcome.status is None)
    lines = [line for line in outcome.stderr.splitlines() if "error:" in line]  # argparse prefixes its own
    if not verdict.hang and (outcome.status != 2 or not any(message in line for line in lines)):
        verdict.wrong = f"exit {outcome.status}, expected 2 with {message!r}; stderr ends {outcome.stderr[-200:]!r}"
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
    return {p.parent.name: json.loads(p.read_text())["steps"] for p in sorted(out.glob("sites/*/ledger.json"))}


def trained_rounds(out: Path) -> dict[str, list[int]]:
    return {p.parent.name: json.loads(p.read_text())["trained_rounds"] for p in sorted(out.glob("sites/*/ledger.json"))}


def recorded_steps(out: Path) -> dict[str, int]:
    """The most steps results.json saw each hospital's ledger report."""
    results = json.loads((out / "results.json").read_text())
    steps: dict[str, int] = {}
    for record in results["rounds"]:
        for hospital in record["hospitals"]:
            steps[hospital["name"]] = max(steps.get(hospital["name"], 0), int(hospital.get("steps", 0)))
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
            verdict = refused(medtune("train", "--data", str(path), "--out", str(out), *extra, cwd=work), message)
            if (out / "ledger.json").exists():
                verdict.wrong = verdict.wrong or "a ledger was written for refused data"
            return verdict

        return case

    def simulate_refused(run_config: str, message: str, *extra: str) -> Callable[[], Verdict]:
        def case() -> Verdict:
            out = work / f"sim-{abs(hash(run_config)) % 10**8}"
            verdict = refused(medtune("simulate", "--out", str(out), "--run-config", run_config, *extra, cwd=work), message)
            if (out / "results.json").exists():
                verdict.wrong = verdict.wrong or "a run started"
            return verdict

        return case

    def certs_twice() -> Verdict:
        out = work / "certificates"
        medtune("certs", "server", "--host", "localhost", "--out", str(out), cwd=work)
        key = digest(out / "server.key")
        verdict = refused(medtune("certs", "server", "--host", "localhost", "--out", str(out), cwd=work), "--rotate")
        if digest(out / "server.key") != key:
            verdict.lost = "server.key was replaced"
        return verdict

    def folder_as_data() -> Verdict:
        folder = work / "folder.csv"
        folder.mkdir(exist_ok=True)
        return refused(medtune("train", "--data", str(folder), "--out", str(work / "o"), cwd=work), "is a directory")

    def unwritable_out() -> Verdict:
        blocker = work / "a-file"
        blocker.write_text("", encoding="utf-8")
        return refused(medtune("train", "--data", str(notes), "--out", str(blocker / "run"), cwd=work), str(blocker))

    def simulate_on_a_bad_row() -> Verdict:
        path = work / "sim-bad-row.csv"
        path.write_text(NOTES + "fever for three days,cardio\n", encoding="utf-8")
        return simulate_refused(f'data-source="{path}" hospitals=2', "row 13: label 'cardio'")()

    def one_label_only() -> Verdict:
        path = work / "one-label.csv"
        path.write_text("text,label\n" + "".join(f"chest pain {i},cardiology\n" for i in range(12)), encoding="utf-8")
        run = work / "one-label-run"
        outcome = medtune("train", "--data", str(path), "--out", str(run), "--num-layers", "2", "--prompt-layer", "1",
                          "--max-length", "32", "--epochs", "1", cwd=work)
        verdict = Verdict(traceback="Traceback" in outcome.stderr, hang=outcome.status is None)
        if outcome.status != 0 or "of 1 label(s)" not in outcome.stderr:
            verdict.wrong = f"exit {outcome.status} without the one-label warning; stderr ends {outcome.stderr[-200:]!r}"
        return verdict

    def audit_a_train_directory() -> Verdict:
        one_label_run = work / "one-label-run"
        if not one_label_run.exists():
            one_label_only()
        return refused(medtune("audit", "--run", str(one_label_run), "--hospital", "hospital_1", cwd=work),
                       "a `medtune train` run")

    return {
        "train: one label only (trains, with a warning)": one_label_only,
        "audit on a `medtune train` directory": audit_a_train_directory,
        "train: label not in the list": file_case("bad-label.csv", "text,label\nchest pain,cardio\n", "label 'cardio'"),
        "train: duplicated header column": file_case("dup.csv", "text,label,text\na,cardiology,b\n", "appear more than once"),
        "train: number as JSONL text": file_case("num.jsonl", '{"text": 12345, "label": "cardiology"}\n', "not a string"),
        "train: empty file": file_case("empty.csv", "", "file is empty"),
        "train: empty label name": file_case("ok.csv", NOTES, "empty label name", "--labels", "a,,b"),
        "train: a folder as --data": folder_as_data,
        "train: --device cuda without CUDA": file_case("ok2.csv", NOTES, "CUDA", "--device", "cuda"),
        "train: --out under a file": unwritable_out,
        "predict: empty --text": lambda: refused(medtune("predict", "--checkpoint", str(work), "--text", "", cwd=work), "is empty"),
        "simulate: run-config token without '='": simulate_refused("epsilon 1.0 hospitals=2", "is not key=value"),
        "simulate: epsilon=-inf": simulate_refused("epsilon=-inf", "must be positive"),
        "simulate: min-hospitals > hospitals": simulate_refused("min-hospitals=4 hospitals=3", "no round could ever aggregate"),
        "simulate: cpus-per-hospital 0": simulate_refused("rounds=1", "cpus-per-hospital must be positive", "--cpus-per-hospital", "0"),
        "simulate: a data file with a bad row": simulate_on_a_bad_row,
        "simulate: labels the data lacks": simulate_refused('labels="a,b"', "missing from the run's label list"),
        "simulate: records-per-hospital=0": simulate_refused("records-per-hospital=0", "must be at least 20"),
        "simulate: until-round=-1": simulate_refused("until-round=-1", "until-round must be 0"),
        "simulate: prompt layer past the backbone": simulate_refused("prompt-layer=9", "is outside 0..6"),
        "certs server run twice": certs_twice,
        "certs node: name with spaces": lambda: refused(
            medtune("certs", "node", "--hospital", "st mary", "--out", str(work / "keys"), cwd=work), "use 1-64 letters"
        ),
        "audit without --hospital": lambda: refused(medtune("audit", "--run", str(work), cwd=work), "--hospital"),
    }


# --- cases on a real simulation --------------------------------------------------------------------


def run_cases(work: Path) -> dict[str, Callable[[], Verdict]]:
    def simulate(out: Path, *extra: str, settings: str = "", **kw) -> Outcome:
        run_config = f"{SMALL_RUN} {settings}".strip()
        return medtune("simulate", "--out", str(out), "--run-config", run_config, *extra, cwd=work, limit=600, **kw)

    finished = work / "finished"

    def rerun_without_resume() -> Verdict:
        first = simulate(finished)
        if first.status != 0:
            return Verdict(traceback="Traceback" in first.stderr, wrong=f"the first run failed: {first.stderr[-300:]!r}")
        before = digest(finished / "results.json")
        verdict = refused(simulate(finished), "already holds a run")
        if digest(finished / "results.json") != before:
            verdict.lost = "results.json was overwritten"
        return verdict

    def two_runs_at_once() -> Verdict:
        out = work / "shared-out"
        first = subprocess.Popen(
            [PYTHON, "-m", "medtune.cli", "simulate", "--out", str(out), "--run-config", SMALL_RUN],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(3)
        verdict = refused(simulate(out), "is in use by pid")
        _, stderr = first.communicate(timeout=600)
        if first.returncode != 0:
            verdict.wrong = verdict.wrong or f"the first run failed: {stderr[-300:]!r}"
        elif ledger_steps(out) != recorded_steps(out):
            verdict.lost = f"ledgers {ledger_steps(out)} against recorded {recorded_steps(out)}"
        return verdict

    def stopped_in_round_2_then_resumed(name: str, interrupt: signal.Signals) -> Callable[[], Verdict]:
        """A stop during round 2: within seconds, nothing of round 2 recorded, no Ray process left, and
        --resume finishes every round with each ledger counting at least the steps recorded."""

        def case() -> Verdict:
            out = work / name
            stopped = simulate(
                out, interrupt=interrupt,
                interrupt_after=lambda: (out / "checkpoints" / "round_001" / "meta.json").exists(),
            )
            verdict = Verdict(traceback="Traceback" in stopped.stderr, hang=stopped.status is None or stopped.seconds > 20)
            if interrupt == signal.SIGKILL:
                expected_status, expected_line = -signal.SIGKILL, ""
            else:
                expected_status, expected_line = 130, f"interrupted: stopped by {interrupt.name}"
            if stopped.status != expected_status or expected_line not in stopped.stderr:
                verdict.wrong = f"{interrupt.name}: exit {stopped.status}, stderr ends {stopped.stderr[-200:]!r}"
            rounds = [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]]
            if rounds != list(range(1, len(rounds) + 1)) or any(
                not (out / "checkpoints" / f"round_{r:03d}" / "meta.json").exists() for r in rounds
            ):
                verdict.wrong = verdict.wrong or f"recorded rounds {rounds} do not match the checkpoints"
            time.sleep(3)
            mine = sorted(p.pid for p in stopped.helpers if running(p))
            if not stopped.helpers:
                verdict.wrong = verdict.wrong or "no Ray process was seen before the stop"
            elif mine:
                verdict.wrong = verdict.wrong or f"Ray processes {mine} outlived the {interrupt.name} by 3 s"
            # A hospital that trained round 2 before the stop spent that budget: its update reached the
            # coordinator, which never recorded it. The resume then trains round 2 again, and a run
            # planned to the last step may have no budget left for round 3; it must say so.
            spent_on_the_lost_round = [h for h, rounds in trained_rounds(out).items() if 2 in rounds]
            resumed = simulate(out, "--resume", str(out))
            final = [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]]
            explained = spent_on_the_lost_round and "privacy budget spent" in resumed.stderr
            if resumed.status != 0 or final[:2] != [1, 2] or (final != [1, 2, 3] and not explained):
                verdict.lost = f"after --resume: exit {resumed.status}, rounds {final}"
            elif any(ledger_steps(out)[h] < s for h, s in recorded_steps(out).items()):
                verdict.lost = f"ledgers {ledger_steps(out)} below recorded {recorded_steps(out)}"
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

    def resume_edge_cases() -> Verdict:
        verdict = refused(simulate(work / "fresh", "--resume", str(finished)), "is not under this run's out directory")
        if (work / "fresh").exists():
            verdict.wrong = verdict.wrong or "a refused resume left an empty folder"
        other = refused(simulate(finished, "--resume", str(finished), settings="learning-rate=0.5"), "other settings")
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
        "Ctrl-C in round 2, then --resume": stopped_in_round_2_then_resumed("interrupted", signal.SIGINT),
        "SIGTERM in round 2, then --resume": stopped_in_round_2_then_resumed("terminated", signal.SIGTERM),
        "SIGKILL in round 2, then --resume": stopped_in_round_2_then_resumed("killed", signal.SIGKILL),
        "resume after a ledger was deleted": deleted_ledger_on_resume,
        "resume: outside out, other settings, edited round, lost results.json": resume_edge_cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the cases that need no simulation")
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
            problems = [t for t, bad in (("traceback", verdict.traceback), ("hang", verdict.hang)) if bad]
            problems += [f"wrong: {verdict.wrong}"] if verdict.wrong else []
            problems += [f"lost: {verdict.lost}"] if verdict.lost else []
            print(f"{'ok  ' if not problems else 'FAIL'} {name} ({time.monotonic() - started:.0f} s)"
                  + "".join(f"\n       {p}" for p in problems), flush=True)
    print(f"\n{len(cases)} cases: " + ", ".join(f"{count} {what}" for what, count in counts.items()))
    return 1 if any(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
