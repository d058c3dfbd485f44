"""Memory at a large site: peak anonymous memory, wall time and feature-cache size of `medtune
train` on N synthetic records, so the claim "memory does not grow with the records" can be checked.

The site runs as its own process, exactly as a hospital runs it (`medtune train --epochs 1`, every
other setting at its default unless given). Its peak is RssAnon (heap and other private memory),
read from /proc/<pid>/status every POLL_S seconds: the memory-mapped feature cache is file-backed,
so the kernel can drop its pages under pressure and RssAnon rightly leaves it out (VmHWM would
count it). Polling can miss a peak shorter than POLL_S; the allocations that grow with the records
(texts, token ids) live for seconds to minutes, so they are not missed. Linux only.

Records are synthetic notes joined four to a record (about 130 words, 780 characters), so every
record fills 128 tokens and the cache holds its full size.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medtune.errors import ConfigError, MedTuneError
from medtune.experiments.perf import long_records
from medtune.files import atomic_write_json
from medtune.synth import LABELS

POLL_S = 0.01
BASE_BYTES = 1 << 30  # the goal: at most 1 GiB plus 2 KiB a record
GOAL_BYTES_PER_RECORD = 2048


def write_site(records: int, path: Path) -> Path:
    """A CSV of `records` synthetic long notes (columns text, label), the same for the same
    count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # an interrupted write is never taken for the site
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((record.text, LABELS[record.label]) for record in long_records(records))
    return partial.replace(path)


def _rss_anon(pid: int) -> int | None:
    """The process's RssAnon in bytes; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def peak_rss_anon(command: list[str], log: Path) -> tuple[int, float, int]:
    """Run `command`, its output into `log`: its peak RssAnon in bytes, wall time in seconds and
    exit status."""
    with log.open("w", encoding="utf-8") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _rss_anon(process.pid) or 0)
            time.sleep(POLL_S)
        return peak, time.perf_counter() - started, process.returncode


def disk_bytes(root: Path) -> int:
    """Bytes the files under `root` take on disk (allocated blocks, not apparent size)."""
    return sum(path.stat().st_blocks * 512 for path in root.rglob("*") if path.is_file())


def measure_site(records: int, work: Path, train_args: list[str]) -> dict:
    """Run `medtune train --epochs 1` on `records` records under `work`; its peak RssAnon, wall
    time, cache size.

    The run starts from an empty out directory, so its cache is built, not reused; the cache is
    deleted after it is measured (its size is in docs/benchmarks.md, section 6).
    """
    if records < 40:
        raise ConfigError(
            f"--records must be at least 40 (a site needs train and test records), got {records}"
        )
    data = work / f"site-{records}.csv"
    if not data.exists():
        write_site(records, data)
    out = work / f"run-{records}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "medtune.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        *train_args,
    ]
    log = work / f"run-{records}.log"
    peak, wall, status = peak_rss_anon(command, log)
    if status != 0:
        raise MedTuneError(f"medtune train exited with status {status}; its output is in {log}")
    cache = disk_bytes(out / "features") if (out / "features").exists() else 0
    shutil.rmtree(out / "features", ignore_errors=True)
    return {
        "records": records,
        "train_args": train_args,
        "peak_rss_anon_bytes": peak,
        "wall_s": wall,
        "cache_disk_bytes": cache,
        "bytes_per_record_over_base": (peak - BASE_BYTES) / records,
        "within_goal": peak <= BASE_BYTES + GOAL_BYTES_PER_RECORD * records,
    }


def run_site_memory(
    counts: list[int], work: Path, train_args: list[str], out: Path | None
) -> list[dict]:
    """One run per record count, each printed as it ends; with two or more counts, the memory per
    extra record."""
    rows = []
    for records in counts:
        row = measure_site(records, work, train_args)
        rows.append(row)
        print(
            f"{records:,} records ({' '.join(['medtune train --epochs 1', *train_args])}): "
            f"peak RssAnon {row['peak_rss_anon_bytes'] / 2**20:,.0f} MiB, wall "
            f"{row['wall_s']:,.0f} s, feature cache {row['cache_disk_bytes'] / 2**20:,.0f} MiB on "
            f"disk ({row['cache_disk_bytes'] / 1024 / records:,.1f} KiB a record); "
            f"{row['bytes_per_record_over_base'] / 1024:,.2f} KiB a record over 1 GiB "
            f"(goal: at most 2 KiB: {'met' if row['within_goal'] else 'NOT met'})",
            flush=True,
        )
    if len(rows) > 1:
        low, high = min(rows, key=lambda r: r["records"]), max(rows, key=lambda r: r["records"])
        slope = (high["peak_rss_anon_bytes"] - low["peak_rss_anon_bytes"]) / (
            high["records"] - low["records"]
        )
        print(
            f"from {low['records']:,} to {high['records']:,} records: {slope / 1024:,.2f} KiB of "
            "peak RssAnon a record"
        )
    if out is not None:
        atomic_write_json(out, rows)
    return rows
