"""A real Flower simulation of 3 hospitals with a tiny backbone: what crosses the wire, epsilon
across rounds, the aggregate, resume, and a spent budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from call_counts import Calls, counting_calls, epsilon_sources
from conftest import tiny_recipe
from federation_harness import federate, task_identity  # noqa: F401 - the fixture is used
from opacus.accountants import create_accountant
from safetensors.numpy import load_file
from test_secure_aggregation import sites

from medtune.checkpoint import load_checkpoint
from medtune.cli import main
from medtune.epsilon import read_epsilon
from medtune.federation.overrides import resolve_run_config
from medtune.run_config import settings_from_run_config
from medtune.state import ExchangedStateSpec

HOSPITALS = ("hospital_1", "hospital_2", "hospital_3")


def tiny_run(backbone: Path, out: Path, **extra: object) -> dict[str, object]:
    return {
        **tiny_recipe(backbone),
        "hospitals": 3,
        "records-per-hospital": 60,
        "epsilon": 8.0,
        "rounds": 2,
        "keep-updates": True,
        "round-timeout": 300.0,
        "out": str(out),
        **extra,
    }


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def ledger(out: Path, hospital: str) -> dict:
    return json.loads((out / "sites" / hospital / "ledger.json").read_text())


@pytest.fixture(scope="module")
def two_rounds_counted(
    tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Calls]:
    """One `medtune simulate` run, as a user starts it, with its reads of the run config and of
    epsilon counted in this process (the command and the ServerApp; the ClientApps run in Ray's
    workers, tests/test_read_once.py counts theirs)."""
    out = tmp_path_factory.mktemp("federation")
    settings = " ".join(
        f"{key}={json.dumps(value)}" for key, value in tiny_run(tiny_backbone_dir, out).items()
    )
    with counting_calls(settings_from_run_config, read_epsilon) as calls:
        assert main(["simulate", "--run-config", settings]) == 0
    return out, calls


@pytest.fixture(scope="module")
def two_rounds(two_rounds_counted: tuple[Path, Calls]) -> Path:
    return two_rounds_counted[0]


@pytest.mark.slow
def test_one_simulate_run_reads_its_run_config_and_epsilon_once_per_entry_point(
    two_rounds_counted: tuple[Path, Calls],
) -> None:
    out, calls = two_rounds_counted
    # The simulate command reads its flags and --run-config once; the ServerApp its run config once.
    assert len(calls["settings_from_run_config"]) == 2
    sources = epsilon_sources(calls)
    assert sources.count("run config 'epsilon'") == 2
    # Beyond those, only each training reply's epsilon, each once (its reply names it: source "").
    trained = [
        h for r in results(out)["rounds"] for h in r["hospitals"] if h["status"] == "trained"
    ]
    assert len(trained) == 6
    assert sorted(sources) == sorted(["run config 'epsilon'"] * 2 + [""] * len(trained))


@pytest.mark.slow
def test_only_exchanged_state_crosses_the_wire(two_rounds: Path) -> None:
    spec = ExchangedStateSpec(prompt_length=4, hidden_size=32, num_labels=5)
    expected = {
        name: {"shape": list(shape), "dtype": "float32"} for name, shape in spec.shapes.items()
    }
    record = results(two_rounds)
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    for round_record in record["rounds"]:
        assert sorted(h["name"] for h in round_record["hospitals"]) == list(HOSPITALS)
        for hospital in round_record["hospitals"]:
            assert hospital["status"] == "trained"
            # no backbone tensor, no text, no per-record gradient
            assert hospital["received"] == expected
            # The arrays' bytes plus Flower's per-array header, nothing more.
            assert spec.num_bytes() <= hospital["bytes_up"] < spec.num_bytes() + 3 * 200
    for update in (two_rounds / "updates" / "round_001").glob("*.safetensors"):
        arrays = load_file(str(update))
        assert {name: list(a.shape) for name, a in arrays.items()} == {
            n: e["shape"] for n, e in expected.items()
        }


@pytest.mark.slow
def test_local_adam_moments_stay_at_the_site_and_carry_across_rounds(two_rounds: Path) -> None:
    """Adam's moments (post-processing of DP gradients) persist beside the ledger; they never
    travel."""
    spec = ExchangedStateSpec(prompt_length=4, hidden_size=32, num_labels=5)
    for name in HOSPITALS:
        moments = load_file(str(two_rounds / "sites" / name / "ledger.optimizer.safetensors"))
        shapes = list(spec.shapes.values())
        # one entry per trainable tensor, in exchanged-state order
        for index, shape in enumerate(shapes):
            assert (
                moments[f"{index}.exp_avg"].shape == shape
                and moments[f"{index}.exp_avg_sq"].shape == shape
            )
            # Adam's step counter continued over both rounds instead of restarting each round.
            assert float(moments[f"{index}.step"]) == ledger(two_rounds, name)["steps"]
    for round_record in results(two_rounds)["rounds"]:
        for hospital in round_record["hospitals"]:
            assert not any("exp_avg" in array for array in hospital["received"])


@pytest.mark.slow
def test_aggregate_is_the_example_weighted_mean_of_the_replies(two_rounds: Path) -> None:
    for server_round in (1, 2):
        hospitals = results(two_rounds)["rounds"][server_round - 1]["hospitals"]
        weights = {h["name"]: h["examples"] for h in hospitals}
        total = sum(weights.values())
        updates = {
            name: load_file(
                str(two_rounds / "updates" / f"round_{server_round:03d}" / f"{name}.safetensors")
            )
            for name in HOSPITALS
        }
        aggregate = load_checkpoint(two_rounds / "checkpoints" / f"round_{server_round:03d}").arrays
        for array_name, array in aggregate.items():
            expected = sum(updates[h][array_name] * (weights[h] / total) for h in HOSPITALS)
            np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_epsilon_grows_and_equals_one_accountant_over_all_steps(two_rounds: Path) -> None:
    rounds = results(two_rounds)["rounds"]
    for name in HOSPITALS:
        seen = [next(h for h in r["hospitals"] if h["name"] == name) for r in rounds]
        assert 0 < seen[0]["epsilon"] < seen[1]["epsilon"] <= 8.0
        assert seen[1]["steps"] == 2 * seen[0]["steps"]
        state = ledger(two_rounds, name)
        assert state["steps"] == seen[1]["steps"]
        # one fresh accountant fed every step so far gives the reported epsilon
        for round_seen in seen:
            accountant = create_accountant("prv")
            accountant.history = [
                (state["noise_multiplier"], state["sample_rate"], round_seen["steps"])
            ]
            assert math.isclose(
                round_seen["epsilon"], accountant.get_epsilon(delta=1e-5), rel_tol=1e-9
            )


def test_resume_matches_an_uninterrupted_run_and_a_spent_budget_stops(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    """Real sites (their ClientApp, ledgers and optimizer state), in-process: Ray adds nothing to
    resume."""

    def run(out: Path, **extra: object) -> None:
        config = resolve_run_config("default", tiny_run(tiny_backbone_dir, out, **extra))
        federate(sites(config, 3), config)

    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    run(interrupted, rounds=3, **{"until-round": 2})
    assert [r["round"] for r in results(interrupted)["rounds"]] == [1, 2]
    run(interrupted, rounds=3, resume=str(interrupted))
    run(straight, rounds=3)

    resumed = load_checkpoint(interrupted / "checkpoints" / "round_003").arrays
    uninterrupted = load_checkpoint(straight / "checkpoints" / "round_003").arrays
    for name in resumed:
        np.testing.assert_allclose(resumed[name], uninterrupted[name], rtol=0, atol=1e-6)
    for name in HOSPITALS:
        assert ledger(interrupted, name)["history"] == ledger(straight, name)["history"]

    # The ledgers were planned for 3 rounds: a 4th round would pass epsilon=8, so every hospital
    # stops.
    before = {name: ledger(straight, name) for name in HOSPITALS}
    run(straight, rounds=4, resume=str(straight))
    record = results(straight)
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    assert any("every hospital's privacy budget is spent" in event for event in record["events"])
    assert sum("stopped training: privacy budget spent" in event for event in record["events"]) == 3
    for name in HOSPITALS:
        assert ledger(straight, name) == before[name]
        assert ledger(straight, name)["epsilon_spent"] <= 8.0


@pytest.mark.slow
def test_predict_uses_only_the_checkpoint_and_backbone(
    two_rounds: Path, tiny_backbone_dir: Path
) -> None:
    from medtune.backbone import embedded_backbone_path
    from medtune.errors import CheckpointError
    from medtune.predict import Classifier, predict_texts

    predictions = predict_texts(
        Classifier.load(two_rounds),
        ["fever and productive cough", "sudden weakness of the left arm"],
    )
    assert len(predictions) == 2
    for prediction in predictions:
        assert math.isclose(sum(prediction.probabilities.values()), 1.0, rel_tol=1e-5)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
    with pytest.raises(CheckpointError, match="different weights hash"):
        Classifier.load(two_rounds, backbone=embedded_backbone_path())  # not the training backbone


@pytest.mark.slow
def test_a_hospital_can_reweight_predictions_to_its_own_label_mix(
    two_rounds: Path, tmp_path: Path, capsys
) -> None:
    from medtune.cli import main
    from medtune.predict import Classifier, predict_texts, site_label_mix

    labels = load_checkpoint(two_rounds / "checkpoints" / "round_002").labels
    site = tmp_path / "site.csv"
    notes = [f"note {i} on chest pain" for i in range(30)] + ["note x on cough"]
    site.write_text(
        "text,label\n"
        + "".join(f"{n},{labels[0]}\n" for n in notes[:30])
        + f"{notes[30]},{labels[1]}\n"
    )
    classifier = Classifier.load(two_rounds)
    mixed = site_label_mix(classifier, site, "text", "label")
    assert mixed.mix[labels[0]] == pytest.approx(31 / 36) and mixed.mix[labels[1]] == pytest.approx(
        2 / 36
    )
    # Re-weighted, the model predicts the site's own mix on the site's own notes.
    on_site = predict_texts(classifier, notes, site=mixed)
    predicted_mix = {label: np.mean([p.probabilities[label] for p in on_site]) for label in labels}
    assert predicted_mix == pytest.approx(mixed.mix, abs=1e-4)

    texts = ["fever and productive cough", "sudden weakness of the left arm"]
    shift = mixed.bias[0] - mixed.bias[1]
    for plain, reweighted in zip(
        predict_texts(classifier, texts), predict_texts(classifier, texts, site=mixed), strict=True
    ):
        odds = lambda p: p.probabilities[labels[0]] / p.probabilities[labels[1]]  # noqa: E731
        assert odds(reweighted) / odds(plain) == pytest.approx(np.exp(shift), rel=1e-4)

    site.write_text(f"text,label\nnote a,{labels[0]}\nnote b,not-a-label\n")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(two_rounds),
                "--text",
                "cough",
                "--label-mix",
                str(site),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "site.csv row 2: label 'not-a-label' is not in the federation's label list" in err
        and "Traceback" not in err
    )


@pytest.mark.slow
def test_the_run_scored_offline_matches_what_the_hospitals_reported(two_rounds: Path) -> None:
    """`medtune benchmark baselines --run` rebuilds each hospital's test split and scores the final
    global model itself; that must agree with the counts the hospitals sent in the last round, and
    the own-label-mix score must be the global model's logits plus the bias matched to the
    hospital's training label mix."""
    import torch

    from medtune.checkpoint import model_from_checkpoint
    from medtune.evaluation import predict_logits
    from medtune.experiments.baselines import score_global_model, splits
    from medtune.features import record_inputs
    from medtune.label_mix import label_mix, mix_bias
    from medtune.run_config import settings_from_run_config

    record = results(two_rounds)
    settings = settings_from_run_config(record["config"])
    offline, mixed = score_global_model(two_rounds)
    last = record["rounds"][-1]
    assert offline.pooled.accuracy == pytest.approx(last["accuracy"])
    for hospital in last["hospitals"]:
        assert offline.per_hospital[hospital["name"]].accuracy == pytest.approx(
            hospital["accuracy"]
        )

    _, model, backbone = model_from_checkpoint(two_rounds)
    for split in splits(settings):
        test = record_inputs(backbone, settings.model, split.test)
        logits = predict_logits(model, test, backbone.tokenizer.pad_token_id, torch.device("cpu"))
        own = record_inputs(backbone, settings.model, split.train)
        own_logits = predict_logits(
            model, own, backbone.tokenizer.pad_token_id, torch.device("cpu")
        )
        bias = mix_bias(
            own_logits, label_mix([r.label for r in split.train], len(settings.data.labels))
        )
        by_hand = (logits.numpy() + bias).argmax(1)
        expected = float((by_hand == test.labels.numpy()).mean())
        assert mixed.per_hospital[split.name].accuracy == pytest.approx(expected)


@pytest.mark.slow
def test_only_a_simulated_run_on_its_own_backbone_is_scored_again(
    two_rounds: Path, tmp_path: Path, capsys
) -> None:
    from medtune.cli import main

    assert main(["benchmark", "baselines", "--run", str(tmp_path)]) == 2
    assert "no results.json here" in capsys.readouterr().err
    assert (
        main(["benchmark", "baselines", "--run", str(two_rounds), "--run-config", "rounds=3"]) == 2
    )
    assert "--run takes the run's own settings" in capsys.readouterr().err

    import shutil

    from medtune.errors import ConfigError
    from medtune.experiments.baselines import score_global_model

    # a run whose record names a hospital these settings do not simulate
    deployed = tmp_path / "deployed"
    shutil.copytree(two_rounds, deployed)
    record = results(deployed)
    record["rounds"][-1]["hospitals"][0]["name"] = "st_marys"
    (deployed / "results.json").write_text(json.dumps(record))
    with pytest.raises(
        ConfigError, match=r"hospitals \['st_marys'\] that its settings do not simulate"
    ):
        score_global_model(deployed)


def test_the_coordinator_imports_no_records_training_or_opacus_code() -> None:
    """The server never touches records or trains: importing its app must not load that code."""
    import subprocess
    import sys

    probe = "import sys, server.app; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    loaded = set(done.stdout.split())
    forbidden = {
        "medtune.data",
        "medtune.train",
        "medtune.features",
        "medtune.site",
        "medtune.standalone",
        "opacus",
    }
    assert not loaded & forbidden, sorted(loaded & forbidden)
    assert "server.federation" in loaded  # the probe did import the coordinator


def test_the_learning_core_imports_no_flower() -> None:
    """Flower lives in medtune/federation/, client/ and server/: a site's core and the experiments
    run without it."""
    import subprocess
    import sys

    probe = (
        "import importlib, pkgutil, sys, medtune\n"
        "names = [m.name for m in pkgutil.walk_packages(medtune.__path__, 'medtune.') "
        "if not m.name.startswith('medtune.federation') "
        "and not m.name.endswith('.__main__')]\n"  # runs a command
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), ' '.join(sorted(n for n in sys.modules "
        "if n.split('.')[0] in ('flwr', 'ray'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    assert int(out[0]) > 30, out[0]  # every core and experiments module was imported
    assert out[1:] == [], out[1:]


def test_every_private_flower_name_medtune_simulate_calls_exists_in_the_installed_flower(
    monkeypatch,
) -> None:
    """`medtune simulate` uses Flower's private in-process runtime; a Flower release that moves it
    fails here."""
    from medtune.federation import flower_engine

    assert flower_engine.missing_private_names() == []
    monkeypatch.setattr(
        flower_engine,
        "PRIVATE_NAMES",
        (*flower_engine.PRIVATE_NAMES, ("flwr.supercore.run", "Run.gone")),
    )
    monkeypatch.setattr(
        flower_engine,
        "RUN_SIMULATION_ARGUMENTS",
        (*flower_engine.RUN_SIMULATION_ARGUMENTS, "renamed"),
    )
    # names first, then arguments
    assert flower_engine.missing_private_names() == ["flwr.supercore.run.Run.gone"]
    monkeypatch.setattr(flower_engine, "PRIVATE_NAMES", flower_engine.PRIVATE_NAMES[:-1])
    assert flower_engine.missing_private_names() == ["_run_simulation(renamed=...)"]


def test_flower_leaves_a_running_ray_alone_so_medtune_keeps_its_stop_handler(monkeypatch) -> None:
    """`start_ray` starts Ray before Flower and puts the SIGTERM handler back that `ray.init`
    replaces; that works only while Flower's Ray backend starts Ray just when it is not running,
    with the arguments MedTune mirrors (its backend config's init_args and the PYTHONPATH runtime
    env).

    Both are run against a stand-in `ray` that records what they ask of it (no Ray is started)."""
    import os
    import sys
    from contextlib import nullcontext

    import ray
    from flower_internals import start_ray_as_flowers_backend

    from medtune.federation import flower_engine, helper_processes

    started: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **arguments: started.append(arguments))
    # no watcher process for no Ray
    monkeypatch.setattr(helper_processes, "ray_helpers_marked", nullcontext)
    backend_config = {
        "init_args": {"num_cpus": 2, "object_store_memory": 10**8},
        "client_resources": {"num_cpus": 1},
    }

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    start_ray_as_flowers_backend(backend_config)
    assert started == []  # a running Ray (MedTune's, with its stop handler back) is left alone

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for start in (start_ray_as_flowers_backend, flower_engine.start_ray):
        monkeypatch.setenv("PYTHONPATH", "/the/users/own/path")
        start(backend_config)
    flowers, medtunes = started
    assert medtunes == flowers  # MedTune starts Ray exactly as Flower would have
    pythonpath = os.pathsep.join([*sys.path, "/the/users/own/path"])
    assert flowers == {
        "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}},
        "include_dashboard": False,
        "num_cpus": 2,
        "object_store_memory": 10**8,
    }
