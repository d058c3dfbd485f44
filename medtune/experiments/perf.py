"""Throughput benchmark: training samples/s with and without DP, inference samples/s, achieved
FLOP/s against the machine's own matmul FLOP/s, and bytes per hospital per round, for each
backbone depth, text length and prompt layer. With a late prompt (layer k > 0) a step runs only
blocks k..L on cached states; the one-off cost of computing that cache is shown as its own rate.
On a GPU the table names the card and its peak.

Texts are synthetic notes joined until they fill max_length, so every batch is full length and
the figures compare like with like. Timings follow one warm-up step; the ratio DP/non-DP comes
from the same run on the same machine. FLOPs per training sample are counted by torch's
FlopCounterMode over one forward and backward pass (matmuls and attention; the frozen backbone
still back-propagates to the prompt, so backward is most of a full one). The machine's peak is a
float32 matmul timed on the same device, so "achieved / peak" says how well the step uses it.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from medtune.backbone import count_parameters, load_backbone, resolve_device
from medtune.config import ModelConfig, PrivacyConfig, TrainConfig
from medtune.data import PadToLongest, Record
from medtune.evaluation import predict_logits
from medtune.features import RecordInputs, record_inputs
from medtune.files import atomic_write_json
from medtune.model import PromptClassifier
from medtune.noise import NoiseSource
from medtune.synth import LABELS, SynthConfig, generate_hospitals
from medtune.train import new_ledger, train_local

SEEDED = NoiseSource.seeded(0, "perf")


def long_records(count: int) -> list[Record]:
    """Synthetic notes joined four to a record (about 130 words): every record fills 128 tokens."""
    notes = [
        text
        for text, _ in generate_hospitals(
            SynthConfig(hospitals=1, mean_records=max(40, 4 * count))
        )[0]
    ]
    return [
        Record(text=" ".join(notes[4 * i : 4 * i + 4]), label=i % len(LABELS)) for i in range(count)
    ]


def _train_rate(
    model: PromptClassifier,
    dataset: RecordInputs,
    warmup: RecordInputs,
    epsilon: float,
    batch_size: int,
    pad: int,
    noise: NoiseSource = SEEDED,
) -> float:
    """Training samples/s; `noise` is seeded (simulation) or secret, as a deployed site draws it."""
    train = TrainConfig(batch_size=batch_size, learning_rate=1e-3)
    privacy = PrivacyConfig(epsilon=epsilon)
    train_local(
        model,
        warmup,
        new_ledger(privacy, len(warmup), batch_size, planned_passes=1),
        train,
        pad,
        seed=0,
        passes=1,
        progress=False,
    )
    ledger = new_ledger(privacy, len(dataset), batch_size, planned_passes=1)
    start = time.perf_counter()
    result = train_local(
        model,
        dataset,
        ledger,
        train,
        pad,
        seed=noise.seed_for(0),
        passes=1,
        progress=False,
        secure_noise=noise.is_secret,
    )
    return result.examples / (time.perf_counter() - start)


def _inference_rate(model: PromptClassifier, dataset: RecordInputs, pad: int) -> float:
    device = resolve_device("auto")
    predict_logits(model, dataset, pad, device)
    start = time.perf_counter()
    predict_logits(model, dataset, pad, device)
    return len(dataset) / (time.perf_counter() - start)


def matmul_flops_per_s(device: torch.device, size: int = 1024, repeats: int = 20) -> float:
    """The machine's practical float32 peak: a square matmul, timed after a warm-up."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_sample(
    model: PromptClassifier, dataset: RecordInputs, batch_size: int, pad: int
) -> float:
    """FLOPs of one forward + backward pass per record, counted by torch (no DP bookkeeping)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    batch = PadToLongest(pad)([dataset[i] for i in range(min(batch_size, len(dataset)))])
    model.train()
    with FlopCounterMode(display=False) as counter:
        logits = model(batch["inputs"].to(device), batch["attention_mask"].to(device))
        torch.nn.functional.cross_entropy(logits, batch["labels"].to(device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["labels"].shape[0]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def run_perf(
    layers: list[int],
    max_lengths: list[int],
    prompt_layers: list[int],
    batch_size: int,
    steps: int,
    out: Path | None,
    backbone_path: str | None = None,
) -> list[dict]:
    device = resolve_device("auto")
    peak = matmul_flops_per_s(device)
    # one JSON row per configuration: numbers, the device's name, None
    rows: list[dict[str, Any]] = []
    records = long_records(batch_size * steps)
    for depth, max_length, prompt_layer in itertools.product(layers, max_lengths, prompt_layers):
        if prompt_layer > depth:
            continue
        backbone = load_backbone(backbone_path, depth, str(device))
        config = ModelConfig(num_layers=depth, max_length=max_length, prompt_layer=prompt_layer)
        model = PromptClassifier(backbone, config, len(LABELS), seed=0)
        started = time.perf_counter()
        dataset = record_inputs(backbone, config, records)
        _synchronize(device)
        inputs_rate = len(records) / (time.perf_counter() - started)
        warmup = record_inputs(backbone, config, records[:batch_size])
        pad = backbone.tokenizer.pad_token_id
        plain = _train_rate(model, dataset, warmup, math.inf, batch_size, pad)
        private = _train_rate(model, dataset, warmup, 8.0, batch_size, pad)
        secret = _train_rate(
            model, dataset, warmup, 8.0, batch_size, pad, NoiseSource.secret("perf")
        )
        flops = train_flops_per_sample(model.to(device), dataset, batch_size, pad)
        exchanged = model.spec.num_bytes()
        full = 4 * (
            count_parameters(backbone.encoder) + sum(p.numel() for p in model.head.parameters())
        )
        rows.append(
            {
                "layers": depth,
                "max_length": max_length,
                "prompt_layer": prompt_layer,
                # layer 0 has nothing to cache
                "inputs_samples_per_s": inputs_rate if prompt_layer else None,
                "batch_size": batch_size,
                "device": _device_name(device),
                "threads": torch.get_num_threads(),
                "train_samples_per_s": plain,
                "train_dp_samples_per_s": private,
                "dp_over_plain": private / plain,
                "train_dp_secret_noise_samples_per_s": secret,  # as a deployed site draws its noise
                "secret_over_seeded": secret / private,
                "inference_samples_per_s": _inference_rate(model, dataset, pad),
                "train_gflop_per_sample": flops / 1e9,
                "achieved_gflop_per_s": flops * plain / 1e9,
                "matmul_peak_gflop_per_s": peak / 1e9,
                "achieved_over_peak": flops * plain / peak,
                "bytes_up_per_round": exchanged,
                "full_finetune_bytes_up_per_round": full,
            }
        )
    table = Table(
        title=f"MedTune throughput ({_device_name(device)}, {torch.get_num_threads()} threads, "
        f"batch {batch_size})"
    )
    columns = (
        "layers",
        "max len",
        "prompt layer",
        "cache/s",
        "train/s",
        "train DP/s",
        "DP/plain",
        "DP secret noise/s",
        "secret/seeded",
        "inference/s",
        "GFLOP/s (of peak)",
        "KiB up/round",
        "full FT MiB/round",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["layers"]),
            str(row["max_length"]),
            str(row["prompt_layer"]),
            "—" if row["inputs_samples_per_s"] is None else f"{row['inputs_samples_per_s']:.0f}",
            f"{row['train_samples_per_s']:.1f}",
            f"{row['train_dp_samples_per_s']:.1f}",
            f"{row['dp_over_plain']:.2f}",
            f"{row['train_dp_secret_noise_samples_per_s']:.1f}",
            f"{row['secret_over_seeded']:.2f}",
            f"{row['inference_samples_per_s']:.1f}",
            f"{row['achieved_gflop_per_s']:.1f} ({row['achieved_over_peak']:.0%} of "
            f"{row['matmul_peak_gflop_per_s']:.0f})",
            f"{row['bytes_up_per_round'] / 1024:.1f}",
            f"{row['full_finetune_bytes_up_per_round'] / 2**20:.1f}",
        )
    Console().print(table)
    if out is not None:
        atomic_write_json(out, rows)
    return rows
