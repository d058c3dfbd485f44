"""End to end with the real embedded MiniLM: offline load, brief DP training, above chance, files written."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main

pytestmark = pytest.mark.e2e


def test_medtune_train_on_embedded_minilm_with_dp(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    data = tmp_path / "data"
    assert main(["data", "synth", "--hospitals", "1", "--records", "1500", "--alpha", "100", "--out", str(data)]) == 0
    status = main(
        ["train", "--data", str(data / "hospital_1.csv"), "--layers", "2", "--epsilon", "8", "--epochs", "4",
         "--batch-size", "64", "--out", str(out)]
    )
    assert status == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    ledger = json.loads((out / "ledger.json").read_text())
    test = metrics["test"]
    majority = max(c["support"] for c in test["per_class"]) / test["examples"]
    print(f"MiniLM-L2, DP eps=8: accuracy {test['accuracy']:.3f} (majority {majority:.3f}), macro-F1 {test['macro_f1']:.3f}")
    assert test["accuracy"] > majority + 0.05
    assert test["macro_f1"] > 0.3
    assert 0 < ledger["epsilon_spent"] <= 8.0
    assert (out / "checkpoint" / "state.safetensors").is_file()
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["backbone_name"].startswith("all-MiniLM-L6-v2") and len(meta["backbone_hash"]) == 64
