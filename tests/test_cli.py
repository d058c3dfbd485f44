"""The command line: bad input is one clear line and exit status 2; synth writes hospitals."""

from __future__ import annotations

import csv
import json
import math

import pytest

from medtune.cli import main
from medtune.cli.flags import given_flags
from medtune.synth import LABELS


def test_synth_writes_one_csv_per_hospital_with_skewed_sizes(tmp_path, capsys):
    assert (
        main(["data", "synth", "--hospitals", "4", "--records", "100", "--out", str(tmp_path)]) == 0
    )
    files = sorted(tmp_path.glob("hospital_*.csv"))
    assert [f.name for f in files] == [f"hospital_{i}.csv" for i in range(1, 5)]
    sizes = []
    for path in files:
        with path.open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(r["label"] in LABELS and r["text"].strip() for r in rows)
        sizes.append(len(rows))
    assert len(set(sizes)) > 1


def test_train_on_a_bad_file_prints_one_clear_error(tmp_path, capsys, tiny_backbone_dir):
    bad = tmp_path / "notes.csv"
    bad.write_text("text,label\nchest pain,cardiology\nheadache,cardio\n", encoding="utf-8")
    status = main(
        [
            "train",
            "--data",
            str(bad),
            "--backbone",
            str(tiny_backbone_dir),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert (
        err.startswith("error: ")
        and "notes.csv row 2: label 'cardio' is not in the federation's label list" in err
    )
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "ledger.json").exists()


def test_bad_config_value_is_named(tmp_path, capsys):
    assert main(["train", "--epsilon", "-1", "--out", str(tmp_path)]) == 2
    assert (
        "--epsilon: epsilon -1 must be positive; only inf (+infinity) means no DP"
        in capsys.readouterr().err
    )


def test_recipe_settings_outside_the_backbone_are_one_line_before_any_work(
    tmp_path, capsys, tiny_backbone_dir
):
    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "chest pain,cardiology\nwheezing,pulmonology\n" * 5, encoding="utf-8"
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(notes),
                "--backbone",
                str(tiny_backbone_dir),
                "--prompt-layer",
                "7",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "prompt-layer) = 7 is outside 0..6: the backbone" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "features").exists()  # refused before caching anything

    base = ["simulate", "--out", str(tmp_path / "sim"), "--run-config"]
    assert main([*base, f'backbone="{tiny_backbone_dir}" prompt-layer=9']) == 2
    assert "prompt-layer) = 9 is outside 0..6: the backbone" in capsys.readouterr().err
    assert main([*base, 'label-descriptions="chest|lungs"']) == 2
    assert "gives 2 descriptions for 5 labels" in capsys.readouterr().err
    assert main([*base, "gpus-per-hospital=-1.0"]) == 2
    assert "gpus-per-hospital must be" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()


def test_a_prompt_too_long_for_the_backbone_is_refused_before_any_feature_cache(
    tmp_path, capsys, tiny_backbone_dir
):
    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "chest pain,cardiology\nwheezing,pulmonology\n" * 5, encoding="utf-8"
    )
    # 182 > 160 positions
    too_long = ["--prompt-length", "150", "--max-length", "32", "--prompt-layer", "3"]
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(notes),
                "--backbone",
                str(tiny_backbone_dir),
                *too_long,
                "--out",
                str(run),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "prompt-length) 150 = 182 tokens exceeds the 160 positions of the backbone" in err
    assert not run.exists()  # no feature cache (nor anything else) left behind

    sim = tmp_path / "sim"
    assert (
        main(
            [
                "simulate",
                "--out",
                str(sim),
                "--run-config",
                f'backbone="{tiny_backbone_dir}" prompt-length=150 max-length=32 prompt-layer=3',
            ]
        )
        == 2
    )
    assert "exceeds the 160 positions" in capsys.readouterr().err
    assert not sim.exists()


def test_simulate_refuses_settings_that_would_hang_or_mislead_before_flower_starts(
    tmp_path, capsys, tiny_backbone_dir
):
    sim = tmp_path / "sim"
    base = ["simulate", "--out", str(sim), "--run-config"]
    cases = {
        # never a silent run at the default budget
        "epsilon 1.0 hospitals=2": "'epsilon' is not key=value",
        "epsilon=-inf": (
            "run config 'epsilon': epsilon -inf must be positive; only inf (+infinity) means no DP"
        ),
        "min-hospitals=4 hospitals=3": (
            "min-hospitals = 4 is more than hospitals = 3: no round could ever aggregate"
        ),
        'labels="a,,b"': "has an empty label name",
        'labels="a,b"': "the synthetic notes use labels",
        "records-per-hospital=0": "synth.mean_records must be at least 20, got 0",
        "until-round=-1": "until-round must be 0 (run every round) or a round number, got -1",
        # Every number is refused where it is read: NaN passes any `<= 0` check made after it.
        "epsilon=1.0 epsilon=50.0": "epsilon is given twice; give each key once",
        "dirichlet-alpha=nan": "run config 'dirichlet-alpha' must be a finite number, got nan",
        "dirichlet-alpha=inf": "run config 'dirichlet-alpha' must be a finite number, got inf",
        "proximal-mu=nan": "run config 'proximal-mu' must be a finite number, got nan",
        "round-timeout=nan": "run config 'round-timeout' must be a finite number, got nan",
        "max-update-norm=nan": "run config 'max-update-norm' must be a finite number, got nan",
        "seed=-1": "train.seed must be a whole number from 0 to 2**32 - 1, got -1",
        "seed=99999999999999999999": (
            "train.seed must be a whole number from 0 to 2**32 - 1, got 99999999999999999999"
        ),
    }
    import torch

    if not torch.cuda.is_available():  # Ray used to wait for ever for the GPU
        cases["gpus-per-hospital=0.5"] = (
            "gpus-per-hospital = 0.5, but this machine has no CUDA GPU; use 0"
        )
    for overrides, message in cases.items():
        assert main([*base, f'backbone="{tiny_backbone_dir}" {overrides}']) == 2, overrides
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (
            overrides,
            err,
        )
    assert (
        main(
            [
                "simulate",
                "--out",
                str(sim),
                "--cpus-per-hospital",
                "0",
                "--run-config",
                f'backbone="{tiny_backbone_dir}"',
            ]
        )
        == 2
    )
    assert "cpus-per-hospital must be positive" in capsys.readouterr().err
    assert not sim.exists()


def test_simulate_never_overwrites_or_shares_a_run(tmp_path, capsys, tiny_backbone_dir):
    from medtune.locks import exclusive

    sim = tmp_path / "sim"
    run = [
        "simulate",
        "--out",
        str(sim),
        "--run-config",
        f'backbone="{tiny_backbone_dir}" num-layers=2 prompt-layer=1',
    ]
    (sim / "checkpoints").mkdir(parents=True)
    (sim / "results.json").write_text('{"rounds": [1]}', encoding="utf-8")
    assert main(run) == 2
    assert (
        f"{sim} already holds a run (results.json); continue it with --resume"
        in capsys.readouterr().err
    )
    assert (sim / "results.json").read_text(encoding="utf-8") == '{"rounds": [1]}'  # untouched

    other = tmp_path / "busy"
    # as a second `medtune simulate` would hold it
    with exclusive(other, "another run's out directory"):
        assert (
            main(
                [
                    "simulate",
                    "--out",
                    str(other),
                    "--run-config",
                    f'backbone="{tiny_backbone_dir}" num-layers=2 prompt-layer=1',
                ]
            )
            == 2
        )
    err = capsys.readouterr().err
    assert f"{other}: this run's out directory is in use by pid" in err and "Traceback" not in err

    outside = tmp_path / "elsewhere"
    assert main([*run[:2], str(tmp_path / "fresh"), "--resume", str(outside), *run[3:]]) == 2
    assert "is not under this run's out directory" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()  # refused before anything was created


def test_wrong_values_are_one_line_errors_not_silent_results(tmp_path, capsys, tiny_backbone_dir):
    cases = []
    duplicated = tmp_path / "dup.csv"
    duplicated.write_text("text,label,text\nchest pain,cardiology,wheezing\n", encoding="utf-8")
    cases.append(
        (
            ["train", "--data", str(duplicated)],
            "dup.csv header: column(s) ['text'] appear more than once",
        )
    )
    numeric = tmp_path / "num.jsonl"
    numeric.write_text('{"text": 12345, "label": "cardiology"}\n', encoding="utf-8")
    cases.append(
        (
            ["train", "--data", str(numeric)],
            "num.jsonl row 1: text in column 'text' is a int, not a string",
        )
    )
    folder = tmp_path / "notes.csv"
    folder.mkdir()
    cases.append(
        (
            ["train", "--data", str(folder)],
            "notes.csv: is a directory; give the records file itself",
        )
    )
    good = tmp_path / "good.csv"
    good.write_text(
        "text,label\n" + "chest pain,cardiology\nwheezing,pulmonology\n" * 5, encoding="utf-8"
    )
    import torch

    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda", "--data", str(good)], "sees no CUDA GPU"))
    cases.append(
        (["predict", "--checkpoint", str(tmp_path), "--text", " "], "--text number 1 is empty")
    )
    cases.append(
        (
            ["certs", "node", "--hospital", "st mary\n", "--out", str(tmp_path / "keys")],
            "--hospital 'st mary\\n': use 1-64",
        )
    )
    for argv, message in cases:
        argv = [*argv, "--backbone", str(tiny_backbone_dir)] if argv[0] == "train" else argv
        assert (
            main([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])]) == 2
        ), argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "keys").exists()


def test_an_out_directory_that_cannot_be_written_is_one_line_before_any_work(
    tmp_path, capsys, tiny_backbone_dir
):
    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "chest pain,cardiology\nwheezing,pulmonology\n" * 5, encoding="utf-8"
    )
    blocked = tmp_path / "a-file"  # a path the OS refuses to make a folder under, even for root
    blocked.write_text("", encoding="utf-8")
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(
        f'epsilons = [8.0]\nseeds = [0]\n[run-config]\nbackbone = "{tiny_backbone_dir}"\n',
        encoding="utf-8",
    )
    nowhere = str(tmp_path / "no-run")  # the work would fail on it: the --out check must come first
    commands = {
        "train": ["train", "--data", str(notes), "--backbone", str(tiny_backbone_dir)],
        "simulate": [
            "simulate",
            "--run-config",
            f'rounds=1 backbone="{tiny_backbone_dir}" num-layers=2 prompt-layer=1',
        ],
        "sweep": ["benchmark", "sweep", "--sweep", str(sweep)],
        "tune": ["benchmark", "tune", "--sweep", str(sweep), "--grid", "prompt-layer=[0,5]"],
        "synth": ["data", "synth"],
        "audit": ["audit", "--run", nowhere, "--hospital", "hospital_1"],
        "baselines": ["benchmark", "baselines", "--run", nowhere],
    }
    for name, argv in commands.items():
        out = blocked / ("run.json" if name in ("audit", "baselines") else "run")
        assert main([*argv, "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: --out {out}: cannot be written") and "Traceback" not in err
        ), (name, err)
    assert (
        main(
            [
                "train",
                "--data",
                str(notes),
                "--ledger",
                str(blocked / "ledger.json"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith(
        f"error: --ledger {blocked / 'ledger.json'}: cannot be written"
    )
    assert not (tmp_path / "run").exists()  # the check leaves no folder behind


def test_certs_server_never_replaces_a_key_unless_asked(tmp_path, capsys):
    out = tmp_path / "certificates"
    assert main(["certs", "server", "--host", "localhost", "--out", str(out)]) == 0
    key = (out / "server.key").read_bytes()
    assert main(["certs", "server", "--host", "localhost", "--out", str(out)]) == 2
    assert "already exist; pass --rotate" in capsys.readouterr().err
    assert (out / "server.key").read_bytes() == key
    assert main(["certs", "server", "--host", "localhost", "--out", str(out), "--rotate"]) == 0
    assert (out / "server.key").read_bytes() != key


def test_train_and_simulate_share_the_defaults_of_pyproject_and_every_config_field_has_a_flag():
    """No default is written twice: the dataclasses and `medtune train`'s flags take theirs from
    pyproject.toml."""
    import dataclasses

    from medtune.cli import build_parser
    from medtune.cli.flags import NOT_FLAGS
    from medtune.config import DataConfig, ModelConfig, PrivacyConfig, TrainConfig
    from medtune.federation.overrides import resolve_run_config
    from medtune.run_config import settings_from_run_config

    simulated = settings_from_run_config(resolve_run_config(None, {}))
    assert ModelConfig() == simulated.model and PrivacyConfig() == simulated.privacy
    assert DataConfig(labels=simulated.data.labels) == simulated.data
    assert TrainConfig() == simulated.train
    args = build_parser().parse_args(["train"])
    # Alone, a hospital makes the passes it makes over the default federation's rounds.
    assert args.passes == simulated.federation.rounds * simulated.train.local_epochs
    for config in (DataConfig, ModelConfig, PrivacyConfig, TrainConfig):
        for field in dataclasses.fields(config):
            if field.name not in NOT_FLAGS:
                # unset: the dataclass default applies
                assert getattr(args, field.name) is None, field.name
    given = build_parser().parse_args(
        ["train", "--prompt-length", "4", "--lr", "0.5", "--epsilon", "inf"]
    )
    assert (
        given.prompt_length,
        given.learning_rate,
        PrivacyConfig(**given_flags(given, PrivacyConfig)).epsilon,
    ) == (4, 0.5, math.inf)


def test_train_takes_the_label_list_and_descriptions_from_their_flags(tmp_path, tiny_backbone_dir):
    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "chest pain radiating,yes\nno complaints today,no\n" * 20, encoding="utf-8"
    )
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(notes),
        "--labels",
        "yes,no",
        "--label-descriptions",
        "a finding|no finding",
        "--backbone",
        str(tiny_backbone_dir),
        "--max-length",
        "16",
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads((out / "metrics.json").read_text())["config"]["data"]
    assert data["labels"] == ["yes", "no"] and data["label_descriptions"] == [
        "a finding",
        "no finding",
    ]


def test_simulate_reads_its_epsilon_flag_once_as_the_run_config_key_it_sets(tmp_path, capsys):
    assert main(["simulate", "--epsilon", "nan", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run config 'epsilon': epsilon is NaN") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_training_data_of_one_label_or_one_record_trains_with_a_warning(
    tmp_path, caplog, tiny_backbone_dir
):
    """It trains (a site may really see one condition), but a model of one label is rarely what was
    meant."""
    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "".join(f"chest pain {i},cardiology\n" for i in range(12)),
        encoding="utf-8",
    )
    argv = [
        "train",
        "--data",
        str(notes),
        "--backbone",
        str(tiny_backbone_dir),
        "--max-length",
        "16",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    with caplog.at_level("WARNING", logger="medtune.data"):
        assert main(argv) == 0
    assert "this site trains on 10 record(s) of 1 label(s)" in caplog.text

    from medtune.federation.overrides import resolve_run_config
    from medtune.federation.partitions import check_hospitals
    from medtune.run_config import settings_from_run_config

    caplog.clear()
    settings = settings_from_run_config(
        resolve_run_config(
            None,
            {
                "data-source": str(notes),
                "hospitals": 2,
                "min-hospitals": 1,
                "backbone": str(tiny_backbone_dir),
            },
        )
    )
    with caplog.at_level("WARNING", logger="medtune.data"):
        check_hospitals(settings)
    assert "hospital_1 trains on" in caplog.text and "of 1 label(s)" in caplog.text


def test_ctrl_c_in_a_command_is_one_line_and_status_130(monkeypatch, capsys):
    import medtune.cli.data_commands as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_synth", interrupted)
    assert main(["data", "synth", "--out", "unused"]) == 130
    err = capsys.readouterr().err
    assert (
        err.startswith("interrupted: stopped by SIGINT before `medtune data synth` finished")
        and "Traceback" not in err
    )


def test_train_says_when_it_builds_a_feature_cache(tmp_path, capsys, tiny_backbone_dir):
    import re

    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "chest pain,cardiology\nwheezing,pulmonology\n" * 10, encoding="utf-8"
    )
    argv = [
        "train",
        "--data",
        str(notes),
        "--backbone",
        str(tiny_backbone_dir),
        "--max-length",
        "16",
        "--epochs",
        "1",
        "--prompt-layer",
        "3",
        "--out",
        str(tmp_path / "run"),
    ]
    built = re.compile(
        r"^feature cache .*/run/features/\w+: \d+ records, [\d.]+ KiB per record \(blocks below "
        r"layer 3\)$"
    )
    assert main(argv) == 0
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("feature cache")
    ]
    # the training and the test split
    assert len(lines) == 2 and all(built.match(line) for line in lines), lines
    # same records: caches found
    assert main([*argv, "--ledger", str(tmp_path / "second.json")]) == 0, capsys.readouterr().err
    assert "feature cache" not in capsys.readouterr().err


def test_an_interrupted_sweep_says_so_once(tmp_path, capsys, monkeypatch, tiny_backbone_dir):
    from medtune.experiments import sweep as sweep_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_cell", interrupted)
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(
        f'epsilons = [8.0]\nseeds = [0]\n[run-config]\nbackbone = "{tiny_backbone_dir}"\n',
        encoding="utf-8",
    )
    assert (
        main(["benchmark", "sweep", "--sweep", str(sweep), "--out", str(tmp_path / "sweep")]) == 130
    )
    err = capsys.readouterr().err
    assert err.count("interrupted:") == 1 and "before `medtune benchmark sweep` finished" in err, (
        err
    )
    assert "Traceback" not in err


def test_train_epochs_is_the_lone_hospitals_total_and_local_epochs_no_flag_of_it(capsys):
    """Alone a hospital has no rounds: --epochs counts all its passes; the per-round local-epochs
    belongs to a federation's run config, not to `medtune train`."""
    from medtune.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--epochs", "3"]).passes == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    shown = capsys.readouterr().out
    assert "--epochs N" in shown and "in total" in shown and "--local-epochs" not in shown
    for argv in (["train", "--local-epochs", "2"], ["train", "--epochs", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "argument --epochs: must be a whole number of passes, at least 1; got '0'" in (
        capsys.readouterr().err
    )
