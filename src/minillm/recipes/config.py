"""The run config: one typed schema for every stage, checked before any data is read.

A run config is YAML with the shared top-level keys (`stage`, `out_dir`, `init_from`, `max_steps`,
`epochs`, …), the typed sections `tokenizer`, `data` and `reward` defined here, and sections whose
schema lives with the code that uses them:

| section     | schema (types, defaults and allowed values)                     |
|-------------|-----------------------------------------------------------------|
| `model`     | `preset` plus any `MiniGPTConfig` field (model/config.py)       |
| `training`  | `TrainingConfig` (training/trainer.py)                          |
| `memory`    | `MemoryConfig` (training/memory.py)                             |
| `lora`      | `LoRAConfig` (model/lora.py)                                    |
| `rollout`   | `RolloutConfig` (rl/rollout.py), stages ppo and grpo            |
| `objective` | the keyword options of the stage's trainer (`DPOTrainer(beta=…)`) |

Every value is checked against its field's type (strictly: `"16"` is not a number, `1` is not `true`)
and then by the section's own checks (ranges, allowed values). An error names where the value came
from (`configs/x.yaml:12`, `override 'training.lr=x'`, `--batch-size`), the key, the value and what
is allowed, in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re
import typing
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from minillm.errors import MiniLLMError
from minillm.training.distributed import MODES as DISTRIBUTED_MODES
from minillm.training.precision import PRECISIONS

STAGES = ("pretrain", "sft", "dpo", "reward", "ppo", "grpo")
RL_STAGES = ("ppo", "grpo")
# The shipped run configs travel inside the package (a wheel installed anywhere has them); the repository's
# `configs/` is a link to this directory.
CONFIG_DIR = Path(str(files("minillm").joinpath("configs")))
# Top-level keys that are also `TrainingConfig` fields: set once, at the top.
SHARED_TRAINING_KEYS = ("max_steps", "epochs", "eval_every", "save_every", "seed", "precision", "distributed")


class RunConfigError(MiniLLMError, ValueError):
    """A run config that cannot work; the message names the file (and line), the key and the value."""


# ---------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `5e-4` as a string (it wants `5.0e-4`); learning rates are written that way, so
    this loader reads any decimal or scientific number as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$", re.IGNORECASE),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> tuple[Any, dict[tuple[str, ...], int]]:
    """The YAML document in `text`, and the line (1-based) of every mapping key in it by its path
    (`("training", "lr")`). A syntax error names `source` and the line."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = _Loader(text).construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RunConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from None
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, str(key.value))] = key.start_mark.line + 1
                walk(value, (*path, str(key.value)))

    if node is not None:
        walk(node, ())
    return data, lines


def load_yaml(text: str) -> Any:
    """The YAML document in `text` (numbers like `5e-4` read as floats)."""
    return parse_yaml(text)[0]


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a config shipped with the package (e.g. `pretrain_tiny`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise RunConfigError(f"config file {name} not found (shipped configs: "
                         f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))) or 'none'})")


# ---------------------------------------------------------------------------------------- schema
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizerSection(_Section):
    path: str | None = None  # a tokenizer directory, tokenizer.json or tiktoken name; null: train one on the data
    vocab_size: int = Field(4096, ge=300)  # of the tokenizer to train (256 bytes + merges + special tokens)
    train_documents: int = Field(20000, ge=1)  # documents of the corpus the tokenizer is trained on


class DataSection(_Section):
    source: str = "builtin"  # "builtin", or a text/JSONL file or directory
    num_documents: int = Field(20000, ge=1)  # size of the built-in corpus
    lang: Literal["zh", "en", "both"] = "both"  # built-in corpus language
    text_field: str = "text"  # JSONL field holding the text
    max_length: int = Field(256, ge=2)  # tokens per training window
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    identity: dict[str, Any] | None = None  # sft on builtin data: {name, maker, maker_zh} of the assistant


class RewardSection(_Section):
    """ppo/grpo: what scores a reply."""

    functions: list[str] | None = None  # built-in names ("answer") or "package.module:function"; null: ["answer"]
    weights: list[float] | None = None  # one per function (and the model last); null: all 1
    model: str | None = None  # a reward model checkpoint (stage reward's final/)


class RunConfig(_Section):
    stage: Literal[STAGES] = "pretrain"  # type: ignore[valid-type]
    out_dir: str = "runs/pretrain"
    init_from: str | None = None  # a checkpoint directory: its weights and tokenizer are the starting point
    resume: str | None = None  # "latest" (the newest checkpoint in out_dir) or a checkpoint directory
    overwrite: bool = False  # start a new run in an out_dir that holds another run's checkpoints (deleting them)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; null: train for `epochs`
    epochs: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=0)
    save_every: int = Field(0, ge=0)
    seed: int = 1337
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    distributed: Literal[DISTRIBUTED_MODES] = "none"  # type: ignore[valid-type]  (launch with torchrun)
    lora: dict[str, Any] | None = None  # LoRAConfig: train adapters on a frozen model
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": "tiny"})
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    training: dict[str, Any] = Field(default_factory=dict)  # TrainingConfig fields
    memory: dict[str, Any] = Field(default_factory=dict)  # MemoryConfig fields
    objective: dict[str, Any] = Field(default_factory=dict)  # the stage trainer's options
    rollout: dict[str, Any] = Field(default_factory=dict)  # ppo/grpo: RolloutConfig fields
    reward: RewardSection = Field(default_factory=RewardSection)


def default_config() -> dict[str, Any]:
    """The run config every file and flag starts from."""
    return RunConfig().model_dump()


# The sections whose schema is a dataclass next to the code that uses it; imported when checked, so this
# module stays importable from anywhere.
def _section_classes() -> dict[str, type]:
    from minillm.data.builtin import Identity
    from minillm.model.config import MiniGPTConfig
    from minillm.model.lora import LoRAConfig
    from minillm.rl.rollout import RolloutConfig
    from minillm.training.memory import MemoryConfig
    from minillm.training.trainer import TrainingConfig

    return {"model": MiniGPTConfig, "training": TrainingConfig, "memory": MemoryConfig, "lora": LoRAConfig,
            "rollout": RolloutConfig, "data.identity": Identity}


def section_fields() -> dict[str, set[str]]:
    """The keys of each section of a run config (for hints: which section a key belongs to)."""
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in _section_classes().items()
              if "." not in name}
    for name in ("tokenizer", "data", "reward"):
        fields[name] = set(RunConfig.model_fields[name].annotation.model_fields)
    return fields


def _stage_trainers() -> dict[str, Any]:
    from minillm.rl.grpo import GRPOTrainer
    from minillm.rl.ppo import PPOTrainer
    from minillm.training.stages import DPOTrainer, RewardTrainer
    from minillm.training.trainer import PreTrainer, SFTTrainer

    return {"pretrain": PreTrainer, "sft": SFTTrainer, "dpo": DPOTrainer, "reward": RewardTrainer,
            "ppo": PPOTrainer, "grpo": GRPOTrainer}


# Keyword arguments of the RL trainers that are not objective options (they come from other sections).
_NOT_OPTIONS = {"ref_model", "prompts", "reward_functions", "reward_weights", "eval_prompts", "rollout"}


def objective_options(stage: str) -> dict[str, Any]:
    """The `objective` options of `stage` with their defaults: the keyword-only arguments of its trainer
    (`DPOTrainer(beta=0.1, loss_type="sigmoid", …)`), the one place they are defined."""
    trainer = _stage_trainers()[stage]
    return {name: p.default for name, p in inspect.signature(trainer.__init__).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in _NOT_OPTIONS}


class _Problem(typing.NamedTuple):
    path: tuple[str, ...]
    message: str  # names the key itself


def _unknown(path: tuple[str, ...], names: Any) -> _Problem:
    names = sorted(names)
    close = difflib.get_close_matches(path[-1], names, n=1)
    hint = f" (did you mean {'.'.join((*path[:-1], close[0]))!r}?)" if close else ""
    return _Problem(path, f"unknown key {'.'.join(path)!r}{hint}; the keys here: {', '.join(names)}")


def _bad(path: tuple[str, ...], value: Any, why: str) -> _Problem:
    return _Problem(path, f"{'.'.join(path)}={value!r}: {why}")


def _strict(hint: Any, value: Any) -> Any:
    """`value` checked against the type `hint` (a list may stand for a tuple, as YAML has no tuples)."""
    if isinstance(value, list) and "tuple" in str(hint):
        value = tuple(value)
    return TypeAdapter(hint, config=ConfigDict(strict=True)).validate_python(value)


def _type_name(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "null")


def _check_fields(cls: type, values: dict[str, Any], path: tuple[str, ...], build: Any = None,
                  allowed: set[str] | None = None) -> tuple[dict[str, Any], list[_Problem]]:
    """Check each key of `values` against the field of that name in the dataclass `cls` (its type), then
    build it once (`build(**values)`, default `cls`) so its own range checks run too."""
    hints = typing.get_type_hints(cls)
    names = allowed if allowed is not None else {f.name for f in dataclasses.fields(cls)}
    checked, problems = {}, []
    for key, value in values.items():
        if key not in names:
            problems.append(_unknown((*path, key), names))
            continue
        try:
            checked[key] = _strict(hints[key], value)
        except ValidationError:
            problems.append(_bad((*path, key), value, f"not a valid {_type_name(hints[key])}"))
    if not problems:
        try:
            (build or cls)(**checked)
        except (TypeError, ValueError) as e:
            problems.append(_Problem(_blamed(path, str(e), names), f"{'.'.join(path)}: {' '.join(str(e).split())}"))
    return checked, problems


def _blamed(path: tuple[str, ...], message: str, names: set[str]) -> tuple[str, ...]:
    """The key a section's own error message is about (it starts with the field name), else the section."""
    match = re.match(r"(?:\w+\.)?(\w+)", message)
    return (*path, match.group(1)) if match and match.group(1) in names else path


def _check_objective(config: dict[str, Any]) -> list[_Problem]:
    stage = config["stage"]
    options = objective_options(stage)
    trainer = _stage_trainers()[stage]
    hints = typing.get_type_hints(trainer.__init__)
    problems = []
    for key, value in config["objective"].items():
        if key not in options:
            problems.append(_Problem(("objective", key), f"'objective.{key}' is not an option of stage {stage} "
                                                         f"(its options: {', '.join(options) or 'none'})"))
            continue
        try:
            config["objective"][key] = _strict(hints[key], value)
        except ValidationError:
            problems.append(_bad(("objective", key), value, f"not a valid {_type_name(hints[key])}"))
    if problems or not config["objective"]:
        return problems
    try:  # the objective's own range checks, without data or a model
        from minillm.training import objectives
        check = {"dpo": objectives.DPOObjective, "reward": objectives.RewardObjective,
                 "ppo": objectives.PPOObjective, "grpo": objectives.GRPOObjective}.get(stage)
        if check is not None:
            accepted = inspect.signature(check).parameters
            check(**{k: v for k, v in config["objective"].items() if k in accepted})
        estimator = config["objective"].get("kl_estimator", "k1")
        if estimator not in objectives.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={estimator!r} is not supported; allowed: "
                             f"{', '.join(objectives.KL_ESTIMATORS)}")
    except (TypeError, ValueError) as e:
        problems.append(_Problem(_blamed(("objective",), str(e), set(options)), f"objective: {' '.join(str(e).split())}"))
    return problems


_NEEDS_INIT = {"dpo": "the SFT checkpoint to align; it is also the reference model",
               "reward": "the SFT checkpoint whose body the reward model starts from",
               "ppo": "the SFT checkpoint to improve; it is also the reference model",
               "grpo": "the SFT checkpoint to improve; it is also the reference model"}
_NO_LORA = {"reward": "the new reward head must train in full",
            "ppo": "the value head trains in full; use stage grpo"}


def _check_stage(config: dict[str, Any]) -> list[_Problem]:
    """The rules that tie sections together."""
    stage, problems = config["stage"], []
    if stage in _NEEDS_INIT and not config["init_from"]:
        problems.append(_Problem(("init_from",), f"stage {stage} needs init_from ({_NEEDS_INIT[stage]})"))
    if config["lora"] is not None and not config["init_from"]:
        problems.append(_Problem(("lora",), "lora adapts a trained model: set init_from to its checkpoint"))
    if stage in _NO_LORA and config["lora"] is not None:
        problems.append(_Problem(("lora",), f"lora with stage {stage} is not supported ({_NO_LORA[stage]})"))
    if stage not in RL_STAGES and config["rollout"]:
        problems.append(_Problem(("rollout",), f"'rollout' is for stages ppo and grpo, not {stage}"))
    for key in config["training"]:
        if key in (*SHARED_TRAINING_KEYS, "out_dir"):
            problems.append(_Problem(("training", key), f"'training.{key}' is a shared key: set {key} at the top "
                                                        "level, not under training"))
    weights, functions = config["reward"]["weights"], config["reward"]["functions"]
    if weights is not None and functions is not None:
        expected = len(functions) + (1 if config["reward"]["model"] else 0)
        if len(weights) != expected:
            problems.append(_Problem(("reward", "weights"), f"reward.weights has {len(weights)} entries for "
                                                           f"{expected} reward functions (one each, the model last)"))
    return problems


def _check_model(config: dict[str, Any]) -> list[_Problem]:
    from minillm.model.config import PRESETS, ConfigError, MiniGPTConfig

    fields = dict(config["model"])
    preset = fields.pop("preset", "tiny")
    if preset is None:
        preset = "tiny"
    if not isinstance(preset, str) or preset not in PRESETS:
        return [_bad(("model", "preset"), preset, f"unknown preset; the presets: {', '.join(PRESETS)}")]
    if "gradient_checkpointing" in fields:  # a training switch, not part of the architecture
        return [_Problem(("model", "gradient_checkpointing"), "'model.gradient_checkpointing' is a training switch: "
                                                              "set memory.gradient_checkpointing instead")]
    if config["init_from"]:
        build = None  # the checkpoint's config is used; only the types are checked
        fields.pop("vocab_size", None)
    else:
        def build(**values: Any) -> Any:
            try:
                return MiniGPTConfig.from_preset(preset, **values)
            except ConfigError as e:
                raise ValueError(str(e)) from None
    names = {f.name for f in dataclasses.fields(MiniGPTConfig)} - {"extra"}
    checked, problems = _check_fields(MiniGPTConfig, fields, ("model",), build=build or (lambda **_: None),
                                      allowed=names)
    config["model"] = {"preset": preset, **checked}
    return problems


def check_run_config(config: dict[str, Any], where: Any = None) -> dict[str, Any]:
    """`config` checked against the schema: the typed top level and sections, each dataclass section's
    fields and own checks, the stage's objective options and the rules between sections. Returns the
    config with values in their types (lists of `target_modules` as tuples, …); raises `RunConfigError`
    naming the first problem by `where(path)` (the file and line it came from)."""
    where = where or (lambda path: "run config")
    try:
        config = RunConfig.model_validate(config).model_dump()
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        path = tuple(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            section = RunConfig if len(path) == 1 else RunConfig.model_fields[path[0]].annotation
            problem = _unknown(path, getattr(section, "model_fields", {}))
        else:
            problem = _bad(path, error["input"], error["msg"][0].lower() + error["msg"][1:])
        raise RunConfigError(f"{where(path)}: {problem.message}") from None
    classes = _section_classes()
    problems = _check_model(config)  # each value first, then the rules that tie sections together
    for name in ("training", "memory", "rollout"):
        config[name], found = _check_fields(classes[name], config[name], (name,))
        problems += found
    if config["lora"] is not None:
        config["lora"], found = _check_fields(classes["lora"], config["lora"], ("lora",))
        problems += found
    if config["data"]["identity"] is not None:
        _, found = _check_fields(classes["data.identity"], config["data"]["identity"], ("data", "identity"))
        problems += found
    problems += _check_objective(config) + _check_stage(config)
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise RunConfigError(f"{where(first.path)}: {first.message}{more}")
    return config


# ---------------------------------------------------------------------------------------- loading
def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                    values: dict[str, Any] | None = None,
                    value_sources: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    """The defaults, updated by the YAML file at `path`, then `values` (command-line flags, named in errors
    by `value_sources`: `{("training", "batch_size"): "--batch-size"}`), then `key=value` overrides (dotted
    keys reach into sections: `model.preset=micro`, `training.lr=3e-4`), checked against the schema before
    anything else happens."""
    config = default_config()
    origins: dict[tuple[str, ...], str] = {}
    fallback = "run config"
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            text = resolved.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RunConfigError(f"{resolved}: not UTF-8 text (byte {e.start})") from None
        loaded, lines = parse_yaml(text, str(resolved))
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise RunConfigError(f"{resolved}: a run config must be a mapping of keys to values, got "
                                 f"{type(loaded).__name__}")
        fallback = str(resolved)
        _merge(config, loaded, origins, lambda p: f"{resolved}:{lines[p]}" if p in lines else str(resolved))
    if values:
        _merge(config, values, origins, lambda p: (value_sources or {}).get(p, "command-line flags"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = parse_yaml(raw, f"override {item!r}")[0]
        _merge(config, nested, origins, lambda p, item=item: f"override {item!r}")

    def where(path: tuple[str, ...]) -> str:
        for end in range(len(path), 0, -1):
            if path[:end] in origins:
                return origins[path[:end]]
        return fallback

    return check_run_config(config, where)


# Sections whose keys are free-form here (checked later against their dataclass) or replaced whole.
_FREE_SECTIONS = ("model", "training", "memory", "lora", "objective", "rollout", "data.identity")


def _merge(base: dict[str, Any], update: dict[str, Any], origins: dict[tuple[str, ...], str], origin: Any,
           prefix: tuple[str, ...] = ()) -> None:
    for key, value in update.items():
        path = (*prefix, str(key))
        _record(origins, origin, path, value)
        if isinstance(base.get(key), dict) and isinstance(value, dict) and ".".join(path) not in _FREE_SECTIONS:
            _merge(base[key], value, origins, origin, path)
        elif isinstance(base.get(key), dict) and isinstance(value, dict):
            base[key] = {**base[key], **copy.deepcopy(value)}
        else:
            base[key] = copy.deepcopy(value)


def _record(origins: dict[tuple[str, ...], str], origin: Any, path: tuple[str, ...], value: Any) -> None:
    """Where the value at `path` (and every key inside it) came from."""
    origins[path] = origin(path)
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(origins, origin, (*path, str(key)), inner)
