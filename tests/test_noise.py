"""A deployed site's DP noise is its own secret; seeded noise is reproducible and documented as
such."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import tiny_recipe

from client.node_config import _deployed_site
from medtune.data import read_records
from medtune.federation.overrides import resolve_run_config
from medtune.label_prior import initial_model
from medtune.noise import NoiseSource
from medtune.run_config import settings_from_run_config
from medtune.site import Instruction, Site
from medtune.synth import SynthConfig, write_hospitals


def _settings(backbone: Path, tmp_path: Path):
    config = resolve_run_config(
        None,
        {
            **tiny_recipe(backbone),
            "hospitals": 1,
            "min-hospitals": 1,
            "rounds": 2,
            "seed": 7,
            "out": str(tmp_path / "run"),
            "epsilon": 8.0,
        },
    )
    return settings_from_run_config(config)


def _trained_prompt(site: Site) -> np.ndarray:
    arrays = dict(
        initial_model(
            site.backbone, site.settings.model, site.settings.data, seed=0
        ).exchanged_state()
    )
    outcome = site.train_round(Instruction(arrays, server_round=1))
    assert outcome.trained
    return outcome.arrays["prompt"]


def test_deployed_sites_with_the_same_seed_and_ledger_position_draw_noise_no_one_else_can_reproduce(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    (records,) = write_hospitals(
        SynthConfig(hospitals=1, mean_records=60, seed=0), tmp_path / "data"
    )
    settings = _settings(tiny_backbone_dir, tmp_path)

    def deployed(folder: str) -> Site:
        node = {
            "hospital": "h1",
            "data-path": str(records),
            "ledger-path": str(tmp_path / folder / "ledger.json"),
            "text-column": "text",
            "label-column": "label",
            "max-epsilon": 8.0,
        }
        return _deployed_site(settings, node)

    # same run seed, hospital, records and ledger position (0)
    first, second = deployed("a"), deployed("b")
    assert first.noise.is_secret and second.noise.is_secret
    released = _trained_prompt(first)
    assert not np.allclose(released, _trained_prompt(second))
    # Whoever knows the run seed, the hospital and the position (the coordinator) computes the
    # seeded draw: it is not what the deployed site released.
    guess = Site(
        "h1",
        read_records(records, settings.data),
        settings,
        tmp_path / "guess" / "ledger.json",
        noise=NoiseSource.seeded(settings.seed, "h1"),
    )
    guessed = _trained_prompt(guess)
    assert not np.allclose(released, guessed)
    again = Site(
        "h1",
        read_records(records, settings.data),
        settings,
        tmp_path / "again" / "ledger.json",
        noise=NoiseSource.seeded(settings.seed, "h1"),
    )
    # seeded noise: anyone with the seed reproduces it
    assert np.array_equal(guessed, _trained_prompt(again))


def test_seeded_noise_repeats_for_the_same_seed_and_moves_with_the_ledger() -> None:
    source = NoiseSource.seeded(7, "h1")
    # reproducible: no privacy against the seed
    assert source.seed_for(0) == NoiseSource.seeded(7, "h1").seed_for(0)
    assert (
        len({source.seed_for(0), source.seed_for(16), NoiseSource.seeded(7, "h2").seed_for(0)}) == 3
    )
    secret = NoiseSource.secret("h1")
    assert secret.seed_for(0) != secret.seed_for(0)  # 64 fresh bits from the OS each round
