"""Simulated hospitals: a user file is split into disjoint, seeded hospital partitions."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medtune.errors import ConfigError
from medtune.federation.overrides import resolve_run_config
from medtune.federation.partitions import simulated_hospital
from medtune.run_config import settings_from_run_config
from medtune.synth import LABELS


def test_user_file_is_partitioned_disjointly_and_reproducibly(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(300):
            writer.writerow([f"note number {i}", LABELS[i % len(LABELS)]])
    settings = settings_from_run_config(
        resolve_run_config(None, {"data-source": str(path), "hospitals": 3, "dirichlet-alpha": 0.5})
    )
    parts = [simulated_hospital(settings, i).records for i in range(3)]
    texts = [{r.text for r in part} for part in parts]
    assert sum(len(t) for t in texts) == 300 and set.union(*texts) == {
        f"note number {i}" for i in range(300)
    }
    assert all(len(part) >= 10 for part in parts)
    assert simulated_hospital(settings, 1).records == parts[1]
    with pytest.raises(ConfigError, match="partition 3 does not exist"):
        simulated_hospital(settings, 3)


def test_unknown_run_config_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['epsilonn'\]"):
        resolve_run_config(None, {"epsilonn": 3.0})


def test_set_up_reads_the_source_once_however_many_hospitals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Checking every hospital and handing each its share generates (or reads and splits) the source
    once: set-up grows linearly with the number of hospitals, not with its square."""
    import medtune.federation.partitions as hospitals

    calls = {"generate": 0, "read": 0}
    generate, read = hospitals.generate_hospitals, hospitals.read_records

    def counted(name, function):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(hospitals, "generate_hospitals", counted("generate", generate))
    monkeypatch.setattr(hospitals, "read_records", counted("read", read))
    synthetic = settings_from_run_config(
        resolve_run_config(None, {"hospitals": 30, "records-per-hospital": 20, "seed": 7})
    )
    checked = hospitals.check_hospitals(synthetic)
    assert [hospitals.simulated_hospital(synthetic, i) for i in range(30)] == checked
    assert calls["generate"] == 1
    path = tmp_path / "notes.csv"
    path.write_text(
        "text,label\n" + "".join(f"note {i},{LABELS[i % len(LABELS)]}\n" for i in range(300))
    )
    from_file = settings_from_run_config(
        resolve_run_config(None, {"data-source": str(path), "hospitals": 20})
    )
    shares = [hospitals.simulated_hospital(from_file, i).records for i in range(20)]
    assert calls["read"] == 1 and sum(map(len, shares)) == 300
    path.write_text(
        "text,label\n" + "".join(f"edited {i},{LABELS[i % len(LABELS)]}\n" for i in range(300))
    )
    # a changed file is read again
    assert hospitals.simulated_hospital(from_file, 0).records[0].text.startswith("edited")
