"""Typed run configuration: YAML presets validated into dataclasses, overridable with `--set`.

Config is data (as in torchtune): a preset names everything a run depends on, and the resolved
config is saved in the run directory so a run can be reproduced from it alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mathtune.speedups import Flags as SpeedupsConfig
from mathtune.stopping import STOP_RULES

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: installed with mathtune
DEFAULT_PRESET = "cpu-demo"
LM_EVAL_SHOTS = 5  # lm-evaluation-harness gsm8k.yaml, num_fewshot
EVAL_BACKENDS = ("mathtune", "vllm")  # eval.backend: which engine generates (mathtune.evaluate)


class ConfigError(ValueError):
    """A bad config: the message names the file and key and says what to do."""


@dataclass
class ModelConfig:
    name: str = "gemma-3-270m"  # Hub id, local path, "gemma-3-270m" (packaged) or "tiny-random"
    dtype: str = "auto"  # auto: bfloat16 where the hardware has it, else float32
    revision: str | None = None

    def check(self) -> None:
        _one_of("model.dtype", self.dtype, ["auto", "bfloat16", "float16", "float32"])


@dataclass
class DataConfig:
    source: str = "gsm8k"  # gsm8k (local dir or Hub), synthetic, auto
    path: str | None = None  # local directory with train.jsonl and test.jsonl
    hub_id: str = "openai/gsm8k"
    hub_config: str = "main"
    train_limit: int | None = None  # use a seeded sample of this many training problems
    validation_fraction: float = 0.1
    seed: int = 42
    skip_invalid: bool = False
    max_length: int = 512  # tokens; longer examples are dropped and counted
    synthetic_size: int = 1000
    synthetic_seed: int = 1234

    def check(self) -> None:
        _one_of("data.source", self.source, ["gsm8k", "synthetic", "auto"])
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        _positive("data.max_length", self.max_length)
        if self.train_limit is not None:
            _positive("data.train_limit", self.train_limit)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    bias: str = "none"
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def check(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        _one_of("lora.bias", self.bias, ["none", "all", "lora_only"])
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty: name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class TrainConfig:
    epochs: float = 3
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int = 50
    early_stopping_patience: int | None = 5  # in evaluations; null turns early stopping off
    early_stopping_metric: str = "eval_loss"
    gradient_checkpointing: bool = False
    # A padding-free batch longer than this many tokens goes through forward and backward in pieces of
    # whole examples: the same gradient, activation memory for the longest piece only; null: whole batches.
    max_tokens_per_pass: int | None = None
    save_total_limit: int | None = 3
    seed: int = 42
    divergence_factor: float | None = None  # stop when the training loss exceeds this x its lowest; null: off
    # Experiment trackers the Trainer logs to (transformers' report_to: tensorboard, trackio, wandb, mlflow, ...);
    # each must be installed. TensorBoard writes to RUN_DIR/tensorboard unless $TENSORBOARD_LOGGING_DIR is set.
    report_to: list[str] = field(default_factory=list)

    def check(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.learning_rate", self.learning_rate)
        _positive("train.batch_size", self.batch_size)
        _positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive("train.logging_steps", self.logging_steps)
        _positive("train.eval_steps", self.eval_steps)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_tokens_per_pass is not None:
            _positive("train.max_tokens_per_pass", self.max_tokens_per_pass)
        if self.early_stopping_patience is not None:
            _positive("train.early_stopping_patience", self.early_stopping_patience)
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ConfigError(f"train.divergence_factor must be above 1 (or null: off), got {self.divergence_factor}")
        _one_of("train.early_stopping_metric", self.early_stopping_metric, ["eval_loss", "eval_exact_match"])
        _one_of(
            "train.lr_scheduler", self.lr_scheduler, ["linear", "cosine", "constant", "constant_with_warmup"]
        )
        if self.report_to:
            from mathtune.training.trackers import tracker_names  # transformers' list; loaded only when asked for

            for i, name in enumerate(self.report_to):
                _one_of(f"train.report_to[{i}]", name, tracker_names())
            if len(set(self.report_to)) < len(self.report_to):
                raise ConfigError(f"train.report_to names a tracker twice: {self.report_to}")


@dataclass
class EvalConfig:
    split: str = "test"
    limit: int | None = 50  # a fixed, seeded subset, the same for every model
    shots: int = 8  # worked examples for the base model (protocol mathtune); a tuned model is asked zero-shot
    # mathtune: mathtune's own stop rule and numeric comparison; lm-eval: lm-evaluation-harness's gsm8k
    # task (its stop strings, its 5 worked examples per problem, its string comparison). docs/answers.md
    protocol: str = "mathtune"
    max_new_tokens: int = 256
    # mathtune: mathtune.generation, on any device; vllm: vLLM's engine, where vLLM is installed (a GPU it supports)
    backend: str = "mathtune"
    batch_size: int | None = None  # rows decoded at once (vLLM: max_num_seqs); null: from the device and free memory
    seed: int = 1234
    generate_every: int = 1  # exact match during training at every Nth evaluation (the Nth, 2Nth, ...); 0: never
    generate_subset: int = 20  # on a fixed, seeded subset of this many validation problems
    robustness_size: int = 0  # N > 0: also evaluate on N fresh generated problems (seed data.synthetic_seed + 1000)

    def check_backend_installed(self) -> None:
        """Before anything is written: the backend's package is importable. Not part of check(), so that
        a run made with vLLM elsewhere can still be read, reported and evaluated here with another backend."""
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError("eval.backend is vllm, but the vllm package is not installed here: install it on a "
                              "machine with a GPU it supports (pip install vllm), or use eval.backend: mathtune")

    @property
    def base_shots(self) -> int:
        """Worked examples for a base model: eval.shots, or the harness's 5 under protocol lm-eval."""
        return LM_EVAL_SHOTS if self.protocol == "lm-eval" else self.shots

    def check(self) -> None:
        _one_of("eval.split", self.split, ["test", "validation"])
        _one_of("eval.protocol", self.protocol, list(STOP_RULES))
        if self.limit is not None:
            _positive("eval.limit", self.limit)
        if self.shots < 0:
            raise ConfigError(f"eval.shots must be >= 0, got {self.shots}")
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _one_of("eval.backend", self.backend, list(EVAL_BACKENDS))
        if self.batch_size is not None:
            _positive("eval.batch_size", self.batch_size)
        if self.generate_every < 0:
            raise ConfigError(f"eval.generate_every must be >= 0 (0 turns it off), got {self.generate_every}")
        _positive("eval.generate_subset", self.generate_subset)
        if self.robustness_size < 0:
            raise ConfigError(f"eval.robustness_size must be >= 0 (0 turns it off), got {self.robustness_size}")


@dataclass
class ReportConfig:
    examples_per_group: int = 3  # problems shown per outcome (fixed, broken, both wrong) in "What the model wrote"
    examples_seed: int = 0  # which problems of each outcome are shown

    def check(self) -> None:
        if self.examples_per_group < 0:
            raise ConfigError(f"report.examples_per_group must be >= 0 (0 shows none), got {self.examples_per_group}")


@dataclass
class CostConfig:
    hardware: str | None = None  # detected when null
    price_per_hour: float | None = None  # USD; a default for the hardware when null


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    speedups: SpeedupsConfig = field(default_factory=SpeedupsConfig)  # each can be switched off to debug or measure

    def check(self) -> None:
        check_run_name(self.name, self.output_dir)
        for section in (self.model, self.data, self.lora, self.train, self.eval, self.report):
            section.check()
        if self.train.early_stopping_metric == "eval_exact_match" and self.eval.generate_every != 1:
            raise ConfigError(
                "train.early_stopping_metric=eval_exact_match compares exact match at every evaluation: "
                f"set eval.generate_every=1 (got {self.eval.generate_every}) or use eval_loss"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_run_name(name: str, output_dir: str) -> None:
    """A run name is one path component, so the run directory output_dir/name lies inside output_dir
    (and `--overwrite` can never reach a folder outside it)."""
    advice = "use a plain folder name such as `gsm8k-r16` (letters, digits, '-', '_', '.')"
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise ConfigError(f"name must be one folder name inside output_dir, got {name!r}: {advice}")
    parent = Path(output_dir).resolve()
    if (parent / name).resolve().parent != parent:  # a symlink named like the run pointing elsewhere
        raise ConfigError(f"name {name!r}: {Path(output_dir) / name} leads outside output_dir {output_dir}: {advice}")


def _positive(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive number, got {value!r}")


def _one_of(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}{_suggest(str(value), allowed)}")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: object, annotation: object) -> object:
    """Check one YAML value against its dataclass field type (YAML already typed it)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and (
        type(value) is annotation or (annotation is float and type(value) is int)
    ):
        return value
    raise ConfigError(f"{key} must be of type {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str, source: str) -> object:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key {full!r}{_suggest(key, names)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full!r} must be a mapping of keys, got {value!r}")
            kwargs[key] = _build(hints[key], value, f"{full}.", source)
        else:
            kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """`section.key=value` with the value read as YAML (so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.epochs=1")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _merge(base: dict, path: list[str], value: object) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset named {name_or_path!r}{_suggest(name_or_path, names)}; presets: {names}")
    return preset


def load_config(preset: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Preset or YAML file, then `--set` overrides, validated into a Config."""
    path = resolve_preset(str(preset or DEFAULT_PRESET))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    config = _build(Config, data, "", source)
    config.check()
    return config


def config_from_dict(data: dict, source: str = "config") -> Config:
    config = _build(Config, data, "", source)
    config.check()
    return config
