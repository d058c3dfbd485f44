"""Which records a simulated hospital holds: its synthetic notes, or its share of one user file.

In simulation every hospital is a partition of the scenario's data source. The synthetic source
generates each hospital with its own writing style, size and label mix. A user file is split
into hospitals with flwr-datasets' Dirichlet partitioner over the label, so `dirichlet-alpha`
means the same thing for both sources. Every node derives its partition from the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medtune.data import Record, read_records, train_test_split, warn_if_thin
from medtune.errors import ConfigError, DataError
from medtune.hospitals import hospital_name
from medtune.run_config import RunSettings
from medtune.synth import generate_hospitals


@dataclass(frozen=True)
class HospitalData:
    name: str
    records: list[Record]


def simulated_hospital(settings: RunSettings, partition_id: int) -> HospitalData:
    """The records of simulated hospital `partition_id` (0-based) of the scenario."""
    count = settings.source.hospitals
    if not 0 <= partition_id < count:
        raise ConfigError(
            f"partition {partition_id} does not exist: the scenario has {count} hospitals; "
            f"run the simulation with num-supernodes = hospitals = {count}"
        )
    return simulated_hospitals(settings)[partition_id]


_built: dict[str, list[HospitalData]] = {}  # this process's scenario: its hospitals, built once


def simulated_hospitals(settings: RunSettings) -> list[HospitalData]:
    """Every simulated hospital of the scenario, built once per process and handed out by index.

    The generator and the partitioner each see the whole source once, so set-up grows linearly with
    the number of hospitals (a simulation process serves many of them, one call each).
    """
    source = Path(settings.source.source) if not settings.source.is_synthetic else None
    stamp = (
        (source.stat().st_mtime_ns, source.stat().st_size)
        if source is not None and source.is_file()
        else None
    )
    key = repr((settings.source, settings.data, settings.seed, stamp))
    if key not in _built:
        _built.clear()
        shares = _synthetic_records(settings) if source is None else _file_shares(source, settings)
        _built[key] = [HospitalData(hospital_name(i), records) for i, records in enumerate(shares)]
    return _built[key]


def _synthetic_records(settings: RunSettings) -> list[list[Record]]:
    """Each hospital's generated notes as records of the run's labels."""
    label_index = {label: i for i, label in enumerate(settings.data.labels)}
    hospitals = generate_hospitals(settings.source.synth_config(settings.seed))
    unknown = sorted({label for notes in hospitals for _, label in notes} - set(label_index))
    if unknown:
        raise ConfigError(
            f"the synthetic notes use labels {unknown} missing from the run's label list"
        )
    return [
        [Record(text=text, label=label_index[label]) for text, label in notes]
        for notes in hospitals
    ]


def _file_shares(path: Path, settings: RunSettings) -> list[list[Record]]:
    """Each hospital's share of a user file, by one seeded Dirichlet split over the labels."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    records = read_records(path, settings.data)
    count = settings.source.hospitals
    minimum = max(2, min(10, len(records) // (2 * count)))
    partitioner = DirichletPartitioner(
        num_partitions=count,
        partition_by="label",
        alpha=settings.source.dirichlet_alpha,
        min_partition_size=minimum,
        self_balancing=False,
        seed=settings.seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"row": list(range(len(records))), "label": [r.label for r in records]}
    )
    try:  # the partitioner splits all rows on its first load, then hands out each share
        return [
            [records[row] for row in partitioner.load_partition(i)["row"]] for i in range(count)
        ]
    except ValueError as error:
        raise DataError(
            f"{path}: cannot split {len(records)} records into {count} hospitals with "
            f"dirichlet-alpha={settings.source.dirichlet_alpha} ({error}); use fewer hospitals or "
            "a larger alpha"
        ) from None


def check_hospitals(settings: RunSettings) -> list[HospitalData]:
    """Every simulated hospital's records, read and checked before any training starts.

    A records file the run cannot use, or a hospital left with nothing to train on, stops the run
    here with the same one-line error `medtune train` gives, instead of a federation of hospitals
    that all fail. Data that trains but probably not as meant (one label only, one record) is
    warned about.
    """
    hospitals = simulated_hospitals(settings)
    for hospital in hospitals:
        try:
            train, _ = train_test_split(
                hospital.records, settings.data.test_fraction, settings.seed
            )
        except DataError as error:
            raise DataError(f"{hospital.name}: {error}") from None
        warn_if_thin(hospital.name, [record.label for record in train])
    return hospitals
