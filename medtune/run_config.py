"""A federated run's settings, read from Flower's flat run config.

The defaults live in medtune/run_defaults.toml (medtune/defaults.py), the table `flwr run .` reads
from pyproject.toml. A scenario file (simulations/scenarios/*.toml) overrides some of them, and
`--run-config` or `medtune simulate` flags override again (fused by
medtune/federation/overrides.py, with Flower's own reader and merge). This module turns the
resulting flat key/value dict into the validated config objects the core uses, once per entry
point, naming any key or value it cannot use.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medtune.config import (
    AuditConfig,
    DataConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    check_fits_backbone,
    field_kinds,
    run_config_key,
)
from medtune.defaults import run_defaults
from medtune.epsilon import NO_DP, read_epsilon
from medtune.errors import ConfigError
from medtune.synth_config import LABELS, SynthConfig

# float keys where inf means "no bound" (epsilon: medtune/epsilon.py)
UNBOUNDED_KEYS = {"max-update-norm"}
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean")
SYNTHETIC = "synthetic"


def shipped_folder(name: str) -> Path:
    """A folder of TOML files shipped in the `simulations` package, wherever that package is
    installed.

    A source checkout, an editable install and a wheel all install it as plain files, so the folder
    is a path: named_toml lists it, opens files in it and names it in errors.
    """
    return Path(str(resources.files("simulations").joinpath(name)))


SCENARIO_DIR = shipped_folder("scenarios")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds and how the server combines the hospitals' prompts and heads."""

    rounds: int
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    min_hospitals: int
    round_timeout: float
    trim_fraction: float
    max_update_norm: float
    max_examples: int
    secure_aggregation: bool
    secagg_max_weight: int
    keep_updates: bool  # every received update kept under out/updates/ (what left each site)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.proximal_mu < 0 or self.server_learning_rate <= 0:
            raise ConfigError("proximal-mu must be >= 0 and server-learning-rate > 0")
        if self.min_hospitals < 1:
            raise ConfigError(f"min-hospitals must be at least 1, got {self.min_hospitals}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round-timeout must be positive seconds, got {self.round_timeout}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(
                f"trim-fraction must be in [0, 0.5) (cut from each tail), got {self.trim_fraction}"
            )
        if not self.max_update_norm > 0:
            raise ConfigError(
                f"max-update-norm must be positive (inf = no bound), got {self.max_update_norm}"
            )
        if self.max_examples < 1:
            raise ConfigError(f"max-examples must be at least 1, got {self.max_examples}")
        if self.secagg_max_weight < 1:
            raise ConfigError(f"secagg-max-weight must be at least 1, got {self.secagg_max_weight}")
        if self.secure_aggregation and self.strategy in ("fedmedian", "trimmed-mean"):
            raise ConfigError(
                f"strategy={self.strategy} needs each hospital's own update, which secure "
                "aggregation hides from the coordinator; use fedavg, fedprox or fedadam with "
                "secure-aggregation=true"
            )
        if self.secure_aggregation and self.min_hospitals < 3:
            raise ConfigError(
                f"secure-aggregation needs min-hospitals >= 3, got {self.min_hospitals}: a sum of "
                "two updates hides neither from the other hospital, and SecAgg+ survives a "
                "dropout only with at least 3"
            )


@dataclass(frozen=True)
class SourceConfig:
    """Where simulated hospitals' records come from: the synthetic generator or one user file."""

    source: str
    hospitals: int
    records_per_hospital: int
    dirichlet_alpha: float

    @property
    def is_synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def synth_config(self, seed: int) -> SynthConfig:
        return SynthConfig(
            hospitals=self.hospitals,
            mean_records=self.records_per_hospital,
            dirichlet_alpha=self.dirichlet_alpha,
            seed=seed,
        )

    def __post_init__(self) -> None:
        if self.hospitals < 1:
            raise ConfigError(f"hospitals must be at least 1, got {self.hospitals}")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet-alpha must be positive, got {self.dirichlet_alpha}")


@dataclass(frozen=True)
class RunSettings:
    scenario: str
    seed: int
    out: Path
    resume: Path | None
    until_round: int
    federation: FederationConfig
    source: SourceConfig
    data: DataConfig
    model: ModelConfig
    privacy: PrivacyConfig
    train: TrainConfig
    cache_dir: Path | None  # simulated sites' feature caches (None: each site's own folder)
    gpus_per_hospital: float
    audit: AuditConfig
    run_config: dict[str, Any]

    @property
    def keeps_updates(self) -> bool:
        """Whether the coordinator keeps every received update: `keep-updates`, or an audit run,
        whose coordinator's view is scored from them (medtune/experiments/canary_audit.py)."""
        return self.federation.keep_updates or self.audit.canaries > 0

    @property
    def last_round(self) -> int:
        """The last round this invocation runs: `until-round` when set, else all rounds."""
        return (
            min(self.until_round, self.federation.rounds)
            if self.until_round
            else self.federation.rounds
        )


def _take(config: dict[str, Any], key: str, kind: type) -> Any:
    if key not in config:
        raise ConfigError(f"run config has no '{key}'; it must be set in [tool.flwr.app.config]")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # +inf, also as MedTune writes it in JSON
    if key in UNBOUNDED_KEYS and value in (NO_DP, math.inf):
        return math.inf
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        # NaN passes every `<= 0` check after this one: each number is refused here, where it is
        # read.
        raise ConfigError(f"run config '{key}' must be a finite number, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"run config '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _config_from(
    config: dict[str, Any], cls: type, renamed: dict[str, str] | None = None, **given: Any
) -> Any:
    """A config dataclass from the run-config keys named after its fields (`prompt_length`
    <- `prompt-length`).

    `renamed` maps the few fields whose key differs; `given` are fields the caller has already read.
    """
    values = {
        name: _take(config, (renamed or {}).get(name, run_config_key(name)), kind)
        for name, kind in field_kinds(cls).items()
        if name not in given and kind is not None  # the label lists' readers give them
    }
    return cls(**values, **given)


def settings_from_run_config(config: dict[str, Any]) -> RunSettings:
    """Validated settings from Flower's flat run config; a wrong key or value names itself."""
    labels_text = _take(config, "labels", str)
    labels = (
        tuple(label.strip() for label in labels_text.split(",")) if labels_text.strip() else LABELS
    )
    if "" in labels:
        raise ConfigError(
            f"run config 'labels' = {labels_text!r} has an empty label name; list names separated "
            "by commas"
        )
    if "epsilon" not in config:
        raise ConfigError("run config has no 'epsilon'; it must be set in [tool.flwr.app.config]")
    epsilon = read_epsilon(config["epsilon"], "run config 'epsilon'")
    resume = _take(config, "resume", str)
    descriptions = _take(config, "label-descriptions", str)
    cache_dir = _take(config, "cache-dir", str)
    gpus = _take(config, "gpus-per-hospital", float)
    if gpus < 0 or (gpus > 1 and not gpus.is_integer()):
        raise ConfigError(
            f"gpus-per-hospital must be a fraction of one GPU or a whole number of GPUs, got {gpus}"
        )
    settings = RunSettings(
        scenario=_take(config, "scenario", str),
        seed=_take(config, "seed", int),
        out=Path(_take(config, "out", str)),
        resume=Path(resume) if resume else None,
        until_round=_take(config, "until-round", int),
        federation=_config_from(config, FederationConfig),
        source=_config_from(config, SourceConfig, renamed={"source": "data-source"}),
        data=_config_from(
            config,
            DataConfig,
            labels=labels,
            label_descriptions=tuple(d.strip() for d in descriptions.split("|"))
            if descriptions.strip()
            else (),
        ),
        model=_config_from(config, ModelConfig),
        privacy=_config_from(config, PrivacyConfig, epsilon=epsilon),
        train=_config_from(config, TrainConfig),
        cache_dir=Path(cache_dir) if cache_dir else None,
        gpus_per_hospital=gpus,
        audit=_config_from(
            config,
            AuditConfig,
            renamed={
                "canaries": "audit-canaries",
                "hospital": "audit-hospital",
                "mode": "audit-mode",
            },
        ),
        run_config={**config, "epsilon": epsilon},  # what Flower passes on: epsilon read, a float
    )
    if settings.federation.min_hospitals > settings.source.hospitals:
        raise ConfigError(
            f"min-hospitals = {settings.federation.min_hospitals} is more than hospitals = "
            f"{settings.source.hospitals}: no round could ever aggregate"
        )
    if settings.until_round < 0:
        raise ConfigError(
            f"until-round must be 0 (run every round) or a round number, got {settings.until_round}"
        )
    # Bounds kept by other objects, checked here too, so that no run, sweep cell or site starts on
    # them:
    check_fits_backbone(settings.model)  # prompt-layer, num-layers, max-length + prompt-length
    if settings.source.is_synthetic:
        # records-per-hospital (medtune/synth_config.py)
        settings.source.synth_config(settings.seed)
    return settings


def named_toml(name_or_path: str, folder: Path, kind: str) -> Path:
    """A shipped TOML file by name (`folder/<name>.toml`) or a user's file by path."""
    candidate = Path(name_or_path)
    path = (
        candidate
        if candidate.suffix == ".toml" or candidate.exists()
        else folder / f"{name_or_path}.toml"
    )
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml"))
        raise ConfigError(f"{kind} {name_or_path!r} not found ({path}); shipped {kind}s: {known}")
    return path


def scenario_path(name_or_path: str) -> Path:
    """A scenario by name (simulations/scenarios/<name>.toml) or by path."""
    return named_toml(name_or_path, SCENARIO_DIR, "scenario")


def read_scenario(name_or_path: str) -> dict[str, Any]:
    """A scenario file's overrides; every key must be a run-config key."""
    path = scenario_path(name_or_path)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not a readable TOML scenario ({error})") from None
    check_keys(values, source=str(path))
    return values


def check_keys(overrides: dict[str, Any], source: str) -> None:
    defaults = run_defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{source}: unknown run-config key(s) {unknown}; known keys: {sorted(defaults)}"
        )
