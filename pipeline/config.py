"""Named training configs: YAML files validated by pydantic, overridable with ``key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import contract
from pipeline.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    source: Literal["keras", "npz", "idx"] = "keras"
    path: str | None = None
    validation_split: float = Field(0.1, gt=0.0, lt=1.0)
    # train on the first N images of the (seeded, shuffled) training split: a cheaper, lower-fidelity
    # trial for a hyperparameter search; validation and test splits stay whole
    train_limit: int | None = Field(None, gt=0)


class ElasticConfig(_Strict):
    """Elastic distortion (Simard, Steinkraus & Platt 2003): a random displacement field, smoothed by a
    Gaussian of ``sigma`` pixels and scaled by ``alpha`` pixels, moves every pixel of a training image."""

    alpha: float = Field(gt=0.0, le=64.0)
    sigma: float = Field(gt=0.0, le=16.0)


class AugmentationConfig(_Strict):
    rotation: float = Field(0.0, ge=0.0, le=0.5)
    translation: float = Field(0.0, ge=0.0, le=0.5)
    zoom: float = Field(0.0, ge=0.0, le=0.5)
    elastic: ElasticConfig | None = None


class ConvBlock(_Strict):
    filters: int = Field(gt=0)
    kernel_size: int = Field(3, gt=0)
    convs: int = Field(1, gt=0)
    strides: Literal[1, 2] = 1  # of the block's first conv: 2 halves the feature maps, as a pool would, for less work
    pool: bool = True  # 2x2 max pooling at the end of the block


class ModelConfig(_Strict):
    rescale: bool = True
    augmentation: AugmentationConfig | None = None
    conv_blocks: list[ConvBlock] = Field(min_length=1)
    batch_norm: bool = False
    # Keras's default, 0.99, averages over ~100 steps: a trial on a few thousand images (21 steps an epoch)
    # validated with statistics still far from its weights' and scored at chance (0.10-0.19).
    batch_norm_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    conv_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    global_pooling: bool = False  # global average pooling instead of flattening the last feature maps
    dense_units: list[int] = []
    dense_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TrainingConfig(_Strict):
    optimizer: Literal["rmsprop", "adam", "sgd"] = "adam"
    learning_rate: float = Field(0.001, gt=0.0)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"  # multi_worker: the cluster in TF_CONFIG
    logical_cpus: int = Field(0, ge=0)
    inter_op_threads: int = Field(0, ge=0)
    log_every_n_steps: int = Field(50, gt=0)  # batch metrics in MLflow during an epoch
    # after training, batch norm statistics re-estimated on this many clean training images (0 = off)
    recalibrate_images: int = Field(16384, ge=0)
    # knowledge distillation: a registered version (alias such as champion, or a version number) whose
    # probabilities at distill_temperature, weighted distill_weight against the labels, are the targets
    teacher: str | None = None
    distill_temperature: float = Field(2.0, gt=0.0)
    distill_weight: float = Field(0.5, ge=0.0, le=1.0)


class ExportConfig(_Strict):
    base_dir: str = "exports"


class RegistryConfig(_Strict):
    model_name: str = contract.REGISTERED_MODEL
    experiment: str = contract.EXPERIMENT
    accuracy_floor: float = Field(0.95, ge=0.0, le=1.0)


class EstimateConfig(_Strict):
    """How fast this config trained on a reference machine: the job tells the user the wait before it starts."""

    images_per_s: float | None = Field(None, gt=0)  # training images per second, all epochs' overheads included
    measured_on: str = "2 CPU cores"


class PipelineConfig(_Strict):
    name: str
    seed: int = 42
    deterministic: bool = False
    data: DataConfig = DataConfig()
    model: ModelConfig
    training: TrainingConfig = TrainingConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    estimate: EstimateConfig = EstimateConfig()

    def to_yaml(self) -> str:
        """The resolved config as a config file: reviewable, committable, loadable by path."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """The resolved hyperparameters as ``section.key`` -> value, for MLflow params (not the estimate)."""
        return _flatten(self.model_dump(mode="json", exclude={"estimate"}))


def config_keys(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> set[str]:
    """Every setting's dotted key (``training.learning_rate``); a list of sections (``model.conv_blocks``)
    is one setting."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        candidates = (
            (info.annotation,) if get_origin(info.annotation) is list else get_args(info.annotation) or (info.annotation,)
        )
        sections = [t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)]
        if sections:
            keys |= config_keys(sections[0], f"{prefix}{name}.")
        if not sections or type(None) in candidates:  # an optional section is also set (or nulled) whole
            keys.add(f"{prefix}{name}")
    return keys


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"config {name_or_path!r} not found (named configs: {', '.join(available_configs())}, or give a path to a .yaml file)"
        )
    return path


def load_config(name_or_path: str, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a named config (``seed``, ``champion``) or a YAML path, apply ``key=value`` overrides, then
    ``values`` (dotted path -> value, as a hyperparameter search sets them).

    An override key is a dotted path (``training.epochs=3``) or, when unambiguous, a bare leaf
    name (``epochs=3``). Values are parsed as YAML (``3``, ``0.5``, ``null``, ``[64, 32]``).
    """
    path = _config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    for override in overrides or []:
        _apply_override(raw, override)
    return _validated(raw, values or {}, path.name)


def with_values(cfg: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """``cfg`` with dotted-key ``values`` set, validated like a config file."""
    return _validated(cfg.model_dump(mode="json"), values, cfg.name)


def _validated(raw: dict[str, Any], values: dict[str, Any], what: str) -> PipelineConfig:
    for key, value in values.items():
        _set(raw, key.split("."), value)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid config {what}: {problems}") from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    path, value = _parse_override(raw, override)
    _set(raw, path, value)


def _parse_override(raw: dict[str, Any], override: str) -> tuple[list[str], Any]:
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    return (key.split(".") if "." in key else _resolve_leaf(raw, key)), value


def override_values(name_or_path: str, overrides: list[str]) -> dict[str, Any]:
    """The settings ``overrides`` fix, as dotted key -> value (``epochs=3`` -> ``training.epochs``)."""
    raw = yaml.safe_load(_config_path(name_or_path).read_text()) or {}
    return {".".join(path): value for path, value in (_parse_override(raw, override) for override in overrides)}


def _set(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"setting {'.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _resolve_leaf(raw: dict[str, Any], leaf: str) -> list[str]:
    matches = [path for path in _flatten(raw) if path.split(".")[-1] == leaf]
    if len(matches) == 1:
        return matches[0].split(".")
    if not matches:
        if leaf in PipelineConfig.model_fields:
            return [leaf]
        raise ConfigError(f"override key {leaf!r} matches no config setting")
    raise ConfigError(f"override key {leaf!r} is ambiguous ({', '.join(matches)}); use the dotted path")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
