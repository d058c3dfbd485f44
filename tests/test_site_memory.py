"""The large-site memory benchmark: what it reports must be what the process held and the disk
took."""

from __future__ import annotations

import sys

from medtune.config import DataConfig
from medtune.data import read_records
from medtune.experiments.site_memory import disk_bytes, peak_rss_anon, write_site
from medtune.synth import LABELS


def test_the_peak_catches_memory_held_briefly_and_leaves_out_a_mapped_file(tmp_path):
    """300 MiB held for a fifth of a second is seen; 300 MiB of a memory-mapped file read in full
    is not."""
    mapped = tmp_path / "cache.bin"
    mapped.write_bytes(b"\1" * (300 << 20))
    script = (
        "import mmap, time\n"
        f"with open({str(mapped)!r}, 'rb') as f:\n"
        "    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
        "sum(m[i] for i in range(0, len(m), 4096))\n"
        "time.sleep(0.3)\n"
        "held = b'\\1' * (300 << 20); time.sleep(0.2); del held; time.sleep(0.3)\n"
    )
    peak, wall, status = peak_rss_anon([sys.executable, "-c", script], tmp_path / "log")
    assert status == 0 and wall > 0.8
    assert 300 << 20 <= peak < 400 << 20


def test_the_site_is_read_back_whole_and_its_size_on_disk_is_counted(tmp_path):
    path = write_site(50, tmp_path / "site.csv")
    records = read_records(path, DataConfig(labels=LABELS))
    assert len(records) == 50 and {r.label for r in records} == set(range(len(LABELS)))
    assert 100 < min(len(r.text.split()) for r in records)  # long notes, to fill 128 tokens
    assert disk_bytes(tmp_path) >= path.stat().st_size and not list(tmp_path.glob("*.partial"))
