"""A hyperparameter search space: a YAML file naming which config settings vary, and how.

    params:
      training.learning_rate: {float: [0.0005, 0.01], log: true}
      training.batch_size: {choice: [64, 128, 256]}
      model.dense_units: {choice: [[], [32], [64]]}
      model.conv_blocks:                      # the list of conv blocks, built from four parts
        blocks: {int: [1, 3]}
        filters: {int: [8, 64], log: true}    # sampled for each block
        convs: {int: [1, 2]}
        kernel_size: {choice: [3, 5]}
        first_stride: {choice: [1, 2]}        # optional: 2 = the first block strides instead of pooling
    pruning: {startup_trials: 3, warmup_epochs: 1, percentile: 50}
    # or successive halving / Hyperband on epochs: {kind: hyperband, min_epochs: 1, reduction_factor: 3}

Every key is checked before any trial runs: it must name a config setting, its range must be
non-empty and of the right type, and each bound or choice must be a value the config accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import config_keys, load_config
from pipeline.errors import ConfigError

SEARCH_DIR = Path(__file__).parent / "configs" / "search"
CONV_BLOCKS = "model.conv_blocks"
CONV_BLOCK_PARTS = ("blocks", "filters", "convs", "kernel_size")
OPTIONAL_CONV_BLOCK_PARTS = ("first_stride",)
PRUNERS = ("percentile", "successive_halving", "hyperband")


@dataclass(frozen=True)
class Param:
    """One varying value: an int or float range (optionally on a log scale) or a list of choices."""

    name: str
    kind: str  # int | float | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str | None = None) -> Any:
        name = name or self.name
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if all(choice is None or isinstance(choice, bool | int | float | str) for choice in self.choices):
            return trial.suggest_categorical(name, list(self.choices))
        # Optuna's choices must be scalars: lists (e.g. dense layer sizes) travel as their JSON text
        return json.loads(trial.suggest_categorical(name, [json.dumps(choice) for choice in self.choices]))

    def extremes(self) -> list[Any]:
        """The values to try against the config before any trial runs."""
        if self.kind == "choice":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass(frozen=True)
class ConvBlocks:
    """``model.conv_blocks``: how many blocks, the filters of each, convs per block and kernel size."""

    blocks: Param
    filters: Param
    convs: Param
    kernel_size: Param
    first_stride: Param | None = None  # 2: the first block's first conv strides, and that block does not pool

    def suggest(self, trial: Any) -> list[dict[str, int]]:
        count = self.blocks.suggest(trial)
        convs, kernel = self.convs.suggest(trial), self.kernel_size.suggest(trial)
        stride = self.first_stride.suggest(trial) if self.first_stride else 1
        return [
            {
                "filters": self.filters.suggest(trial, f"{CONV_BLOCKS}.{i}.filters"),
                "kernel_size": kernel,
                "convs": convs,
                **({"strides": 2, "pool": False} if i == 0 and stride == 2 else {}),
            }
            for i in range(count)
        ]

    def extremes(self) -> list[Any]:
        strides = self.first_stride.extremes() if self.first_stride else [1]
        return [
            [{"filters": filters, "kernel_size": kernel, "convs": convs, "strides": stride}]
            + [{"filters": filters, "kernel_size": kernel, "convs": convs}] * (blocks - 1)
            for blocks in self.blocks.extremes()
            for filters in self.filters.extremes()
            for convs in self.convs.extremes()
            for kernel in self.kernel_size.extremes()
            for stride in strides
        ]


@dataclass(frozen=True)
class Pruning:
    """When a trial stops early, judged on its validation accuracy after each epoch.

    ``percentile`` (the default): after ``warmup_epochs`` and once ``startup_trials`` trials have
    completed, a trial below the ``percentile`` of the completed trials' accuracy at the same epoch stops.
    ``successive_halving``: at epochs ``min_epochs * reduction_factor**k`` only the best
    ``1/reduction_factor`` of the trials that reached that epoch go on (Optuna's SuccessiveHalvingPruner).
    ``hyperband``: several successive-halving brackets with different ``min_epochs`` (Optuna's
    HyperbandPruner), so that a slow starter is not always judged after one epoch.
    """

    startup_trials: int = 3
    warmup_epochs: int = 1
    percentile: float = 50.0
    kind: str = "percentile"
    min_epochs: int = 1
    reduction_factor: int = 3


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: dict[str, Param | ConvBlocks]
    pruning: Pruning = field(default_factory=Pruning)
    base: str | None = None  # the config trials start from, unless --config says otherwise

    def sample(self, trial: Any) -> dict[str, Any]:
        """One trial's values, by dotted config key."""
        return {key: param.suggest(trial) for key, param in self.params.items()}

    def without(self, fixed: set[str] | dict[str, Any]) -> SearchSpace:
        """This space less the settings ``fixed`` names (a ``--set`` key holds for every trial), and less
        any setting inside a fixed section (fixing ``model.augmentation`` fixes its parts)."""
        keep = {
            key: param
            for key, param in self.params.items()
            if not any(key == name or key.startswith(f"{name}.") for name in fixed)
        }
        if not keep:
            raise ConfigError(f"search space {self.path}: --set fixes every setting it varies ({', '.join(sorted(fixed))})")
        return replace(self, params=keep)

    def check_against(self, config: str, overrides: list[str]) -> None:
        """Fail fast, naming the key, when a bound or choice is not a value ``config`` accepts."""
        for key, param in self.params.items():
            for value in param.extremes():
                try:
                    load_config(config, overrides, {key: value})
                except ConfigError as exc:
                    problem = str(exc).split(": ", 1)[-1]
                    raise ConfigError(f"search space {self.path}: {key}: {value!r} is not accepted ({problem})") from None


def resolve_path(name_or_path: str) -> Path:
    """A path, or the name of a file under ``pipeline/configs/search/`` (``champion``)."""
    path = Path(name_or_path)
    return path if path.suffix else SEARCH_DIR / f"{name_or_path}.yaml"


def load_space(name_or_path: str) -> SearchSpace:
    """Parse and validate a search space file; raises :class:`ConfigError` naming the key at fault."""
    path = resolve_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"search space {name_or_path!r} not found (a YAML file, or a name under {SEARCH_DIR})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path} is not valid YAML: {exc}") from None
    where = f"search space {path}"
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{where}: needs a non-empty `params` mapping of config keys to ranges")
    unknown = set(raw) - {"params", "pruning", "base"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(sorted(unknown))} (use params, pruning, base)")
    known = config_keys()
    params: dict[str, Param | ConvBlocks] = {}
    for key, spec in raw["params"].items():
        if key not in known:
            raise ConfigError(f"{where}: {key!r} is not a config setting (settings: {', '.join(sorted(known))})")
        if key == CONV_BLOCKS:
            if (
                not isinstance(spec, dict)
                or not set(CONV_BLOCK_PARTS) <= set(spec)
                or set(spec) - {*CONV_BLOCK_PARTS, *OPTIONAL_CONV_BLOCK_PARTS}
            ):
                raise ConfigError(
                    f"{where}: {key} needs exactly {', '.join(CONV_BLOCK_PARTS)} (and optionally "
                    f"{', '.join(OPTIONAL_CONV_BLOCK_PARTS)}), each a range or choices"
                )
            parts = {part: _param(f"{key}.{part}", spec[part], where) for part in spec}
            for part, param in parts.items():
                if param.kind == "float":
                    raise ConfigError(f"{where}: {key}.{part} must be whole numbers (int or choice), not a float range")
            params[key] = ConvBlocks(**parts)
        else:
            params[key] = _param(key, spec, where)
    pruning = raw.get("pruning") or {}
    pruning_keys = set(Pruning.__dataclass_fields__)
    if not isinstance(pruning, dict) or set(pruning) - pruning_keys:
        raise ConfigError(f"{where}: pruning takes {', '.join(sorted(pruning_keys))}")
    prune = Pruning(**pruning)
    if prune.kind not in PRUNERS:
        raise ConfigError(f"{where}: pruning kind {prune.kind!r} is not one of {', '.join(PRUNERS)}")
    if prune.startup_trials < 0 or prune.warmup_epochs < 0 or not 0 <= prune.percentile <= 100:
        raise ConfigError(f"{where}: pruning needs startup_trials >= 0, warmup_epochs >= 0 and 0 <= percentile <= 100")
    if prune.min_epochs < 1 or prune.reduction_factor < 2:
        raise ConfigError(f"{where}: pruning needs min_epochs >= 1 and reduction_factor >= 2")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{where}: base must name a config")
    return SearchSpace(path, params, prune, base)


def _param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: {key}: expected a mapping such as {{int: [1, 3]}}, {{float: [0.1, 0.5]}} or {{choice: [...]}}"
        )
    kinds = [kind for kind in ("int", "float", "choice") if kind in spec]
    extra = set(spec) - {"int", "float", "choice", "log"}
    if len(kinds) != 1 or extra:
        raise ConfigError(f"{where}: {key}: give exactly one of int, float or choice (and optionally log), not {sorted(spec)}")
    kind, bounds, log = kinds[0], spec[kinds[0]], spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {key}: log must be true or false")
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list")
        if log:
            raise ConfigError(f"{where}: {key}: log applies to int and float ranges, not choices")
        return Param(key, kind, choices=tuple(bounds))
    number = int if kind == "int" else (int, float)
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)
    ):
        raise ConfigError(
            f"{where}: {key}: {kind} needs [low, high] as {'integers' if kind == 'int' else 'numbers'}, got {bounds!r}"
        )
    low, high = bounds
    if low >= high:
        raise ConfigError(f"{where}: {key}: the range [{low}, {high}] is empty (low must be below high)")
    if log and low <= 0:
        raise ConfigError(f"{where}: {key}: a log scale needs low > 0, got {low}")
    return Param(key, kind, float(low), float(high), log)
