"""A training run from a YAML config (or flags): tokenizer → data → model → `Trainer` → checkpoints.

A run config has the shared top-level keys (`stage`, `out_dir`, `init_from`, `max_steps`, `epochs`,
`eval_every`, `save_every`, `seed`, `precision`, `distributed`, `lora`) and the sections `model` (a
`preset` plus any `MiniGPTConfig` field), `tokenizer`, `data`, `training` (any `TrainingConfig` field)
and `memory` (`MemoryConfig`). Unknown keys are refused with their name, so a typo never silently falls
back to a default.

Under `torchrun --nproc_per_node=N -m minillm train …` with `distributed: ddp|fsdp`, rank 0 prepares the
tokenizer and the token shards while the other ranks wait, then every rank loads them; `batch_size` is
per process, so the global batch is batch_size × grad_accum_steps × N.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from minillm.data.builtin import (
    Identity,
    builtin_corpus,
    builtin_preference_pairs,
    builtin_rl_prompts,
    builtin_sft_conversations,
)
from minillm.data.formats import Conversation, PreferencePair, PromptRecord, load_records
from minillm.data.preference import PreferenceDataset
from minillm.data.pretrain import (
    TokenShards,
    iter_documents,
    split_train_val,
    tokenize_corpus,
    write_token_shards,
)
from minillm.data.sft import ConversationDataset
from minillm.io import atomic_write_json, atomic_write_text, cache_root
from minillm.model.config import ConfigError, MiniGPTConfig
from minillm.model.heads import MiniGPTRewardModel, MiniGPTWithValueHead, is_reward_checkpoint
from minillm.model.lora import LoRAConfig, apply_lora
from minillm.model.transformer import MiniGPT, load_config
from minillm.rl.grpo import GRPOTrainer
from minillm.rl.ppo import PPOTrainer
from minillm.rl.reward import RewardModelScorer, resolve_reward_function
from minillm.rl.rollout import RolloutConfig, as_prompt_records
from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.manager import TokenizerManager
from minillm.tokenizer.pretrained import TokenizerLoadError, load_tokenizer
from minillm.training import distributed as dist_utils
from minillm.training.checkpoint import latest_checkpoint, resolve_checkpoint
from minillm.training.memory import MemoryConfig, MemoryEstimate, estimate_memory
from minillm.training.trainer import (
    DPOTrainer,
    PreTrainer,
    RewardTrainer,
    SFTTrainer,
    Trainer,
    TrainingConfig,
    resolve_precision,
)

logger = logging.getLogger("minillm.training")

STAGES = ("pretrain", "sft", "dpo", "reward", "ppo", "grpo")
RL_STAGES = ("ppo", "grpo")
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"

DEFAULTS: dict[str, Any] = {
    "stage": "pretrain",
    "out_dir": "runs/pretrain",
    "init_from": None,  # a checkpoint directory: its weights and tokenizer are the starting point
    "resume": None,  # "latest" (the newest checkpoint in out_dir) or a checkpoint directory
    "max_steps": None,  # optimizer steps; null: train for `epochs`
    "epochs": 1.0,
    "eval_every": 100,
    "save_every": 0,
    "seed": 1337,
    "precision": "auto",  # auto | fp32 | bf16 | fp16
    "distributed": "none",  # none | ddp | fsdp (launch with torchrun)
    "lora": None,  # {rank, alpha, dropout, target_modules}: train LoRA adapters on a frozen model
    "model": {"preset": "tiny"},
    "tokenizer": {
        "path": None,  # a tokenizer directory, tokenizer.json or tiktoken name; null: train one on the data
        "vocab_size": 4096,
        "train_documents": 20000,  # documents of the corpus the tokenizer is trained on
    },
    "data": {
        "source": "builtin",  # "builtin", or a text/JSONL file or directory
        "num_documents": 20000,  # size of the built-in corpus
        "lang": "both",  # built-in corpus language: zh | en | both
        "text_field": "text",  # JSONL field holding the text
        "max_length": 256,  # tokens per training window
        "val_fraction": 0.05,
        "skip_bad": False,  # skip (and count) malformed records instead of stopping
        "identity": None,  # sft on builtin data: {name, maker, maker_zh} of the assistant
    },
    "training": {},
    "memory": {},  # MemoryConfig: gradient_checkpointing, micro_batch_size, grad_accum_steps, optimizer_offload
    "objective": {},  # the stage's own options; dpo: beta, loss_type, label_smoothing, precompute_ref_logps
    "rollout": {},  # ppo/grpo: RolloutConfig (prompts_per_rollout, samples_per_prompt, max_new_tokens, …)
    "reward": {  # ppo/grpo: what scores a reply
        "functions": None,  # built-in names ("answer") or "package.module:function"; null: ["answer"] unless model
        "weights": None,  # one per function (and the model last); null: all 1
        "model": None,  # a reward model checkpoint (stage reward's final/)
    },
}
OBJECTIVE_OPTIONS = {
    "pretrain": {}, "sft": {},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0,
            "precompute_ref_logps": False},
    "reward": {"margin": 0.0, "center_coefficient": 0.0},
    "ppo": {"kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True,
            "clip_range": 0.2, "clip_range_value": 0.2, "vf_coef": 0.1, "missing_stop_penalty": 0.0},
    "grpo": {"beta": 0.04, "clip_low": 0.2, "clip_high": None, "scale_rewards": True},
}
SHARED_TRAINING_KEYS = ("max_steps", "epochs", "eval_every", "save_every", "seed", "precision", "distributed")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `5e-4` as a string (it wants `5.0e-4`); learning rates are written that way, so
    this loader reads any decimal or scientific number as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$", re.IGNORECASE),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class RunConfigError(ValueError):
    """A run config that cannot work; the message names the file and key."""


# ---------------------------------------------------------------------------------------- config
def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a config shipped in `configs/` (e.g. `pretrain_tiny`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise RunConfigError(f"config file {name} not found (shipped configs: "
                         f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))) or 'none'})")


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                    values: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS, updated by the YAML file at `path`, then `values`, then `key=value` overrides
    (dotted keys reach into sections: `model.preset=micro`, `training.lr=3e-4`)."""
    config = copy.deepcopy(DEFAULTS)
    source = "defaults"
    if path is not None:
        resolved = resolve_config_path(path)
        source = str(resolved)
        try:
            loaded = _load_yaml(resolved.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RunConfigError(f"{resolved}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise RunConfigError(f"{resolved}: a run config must be a mapping of keys to values")
        _merge(config, loaded, source)
    if values:
        _merge(config, values, "command-line flags")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} must look like key=value (e.g. max_steps=100)")
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = _load_yaml(raw)
        _merge(config, nested, f"override {item!r}")
    _validate(config, source)
    return config


def _merge(base: dict[str, Any], update: dict[str, Any], source: str, prefix: str = "") -> None:
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            if prefix.startswith(("model.", "training.", "memory.", "lora.", "objective.", "rollout.")):
                base[key] = value  # validated against MiniGPTConfig / TrainingConfig / MemoryConfig / LoRAConfig
                continue
            raise RunConfigError(f"{source}: unknown key {name!r}; known keys here: {', '.join(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise RunConfigError(f"{source}: {name!r} must be a mapping")
            _merge(base[key], value, source, f"{name}.")
        else:
            base[key] = value


_NEEDS_INIT = {"dpo": "the SFT checkpoint to align; it is also the reference model",
               "reward": "the SFT checkpoint whose body the reward model starts from",
               "ppo": "the SFT checkpoint to improve; it is also the reference model",
               "grpo": "the SFT checkpoint to improve; it is also the reference model"}
_NO_LORA = {"reward": "the new reward head must train in full",
            "ppo": "the value head trains in full; use stage grpo"}


def _check_section(source: str, name: str, cls: type, values: dict[str, Any]) -> None:
    """Build the section's dataclass once, so a bad value fails with the section's name."""
    try:
        cls(**values)
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{source}: {name}: {e}") from None


def _validate(config: dict[str, Any], source: str) -> None:
    if config["stage"] not in STAGES:
        raise RunConfigError(f"{source}: stage={config['stage']!r} is not available; available stages: "
                             f"{', '.join(STAGES)}")
    if config["distributed"] in (None, False):
        config["distributed"] = "none"
    if config["distributed"] not in dist_utils.MODES:
        raise RunConfigError(f"{source}: distributed={config['distributed']!r} is not supported; allowed: "
                             f"{', '.join(dist_utils.MODES)}")
    if config["lora"] is not None:
        if not isinstance(config["lora"], dict):
            raise RunConfigError(f"{source}: 'lora' must be a mapping (rank, alpha, dropout, target_modules) "
                                 "or null")
        _check_section(source, "lora", LoRAConfig, config["lora"])
    _check_section(source, "memory", MemoryConfig, config["memory"])
    allowed = OBJECTIVE_OPTIONS[config["stage"]]
    for key in config["objective"]:
        if key not in allowed:
            raise RunConfigError(f"{source}: 'objective.{key}' is not an option of stage {config['stage']} "
                                 f"(its options: {', '.join(allowed) or 'none'})")
    stage = config["stage"]
    if stage in _NEEDS_INIT and not config["init_from"]:
        raise RunConfigError(f"{source}: stage {stage} needs init_from ({_NEEDS_INIT[stage]})")
    if stage in _NO_LORA and config["lora"] is not None:
        raise RunConfigError(f"{source}: lora with stage {stage} is not supported ({_NO_LORA[stage]})")
    if stage in RL_STAGES:
        _check_section(source, "rollout", RolloutConfig, config["rollout"])
        functions = config["reward"]["functions"]
        if functions is not None and (not isinstance(functions, list) or not all(isinstance(f, str) for f in functions)):
            raise RunConfigError(f"{source}: reward.functions must be a list of names, got {functions!r}")
    elif config["rollout"]:
        raise RunConfigError(f"{source}: 'rollout' is for stages ppo and grpo, not {config['stage']}")
    model_fields = set(MiniGPTConfig.__dataclass_fields__) | {"preset"}
    for key in config["model"]:
        if key not in model_fields:
            raise RunConfigError(f"{source}: unknown key 'model.{key}'; use 'preset' or a MiniGPTConfig field")
    if not config["init_from"]:  # build the config once now, so a bad model fails before any data work
        fields = {k: v for k, v in config["model"].items() if k != "preset"}
        try:
            MiniGPTConfig.from_preset(config["model"].get("preset") or "tiny", **fields)
        except ConfigError as e:
            raise RunConfigError(f"{source}: model: {e}") from None
    for key in config["training"]:
        if key not in TrainingConfig.field_names() or key in SHARED_TRAINING_KEYS + ("out_dir",):
            raise RunConfigError(f"{source}: 'training.{key}' is not a training option here "
                                 f"(shared keys like max_steps go at the top level)")
    data = config["data"]
    if not isinstance(data["max_length"], int) or data["max_length"] < 2:
        raise RunConfigError(f"{source}: data.max_length must be an integer >= 2, got {data['max_length']!r}")


# ---------------------------------------------------------------------------------------- pieces
def build_tokenizer(config: dict[str, Any], documents: list[str] | None) -> BPETokenizer:
    spec = config["tokenizer"]
    if config["init_from"]:
        return BPETokenizer.from_pretrained(resolve_checkpoint(config["init_from"]))
    if spec["path"]:
        try:
            return load_tokenizer(spec["path"])
        except TokenizerLoadError as e:
            raise RunConfigError(f"tokenizer.path: {e}") from None
    source = config["data"]["source"]
    texts = documents if documents is not None else iter_documents(source, config["data"]["text_field"])
    sample = []
    for text in texts:
        sample.append(text)
        if len(sample) >= spec["train_documents"]:
            break
    return TokenizerManager(cache_dir()).get_or_train(sample, int(spec["vocab_size"]))


def cache_dir() -> Path:
    """Where trained tokenizers are cached: `tokenizers/` in `cache_root()` (`$MINILLM_CACHE_DIR`, else
    `~/.cache/minillm`)."""
    return cache_root() / "tokenizers"


def build_model(config: dict[str, Any], tokenizer: BPETokenizer) -> MiniGPT:
    if config["stage"] == "reward":  # the SFT model's body with a new scalar head (or a reward checkpoint)
        model = MiniGPTRewardModel.from_base(resolve_checkpoint(config["init_from"]))
    elif config["stage"] == "ppo":  # the policy with a value head (a new one, or the checkpoint's)
        model = MiniGPTWithValueHead.from_policy(resolve_checkpoint(config["init_from"]))
    elif config["init_from"]:
        model = MiniGPT.from_pretrained(resolve_checkpoint(config["init_from"]))
    else:
        model = MiniGPT(run_model_config(config, tokenizer))
    if config["lora"] is not None:
        if not config["init_from"]:
            raise RunConfigError("lora: LoRA adapts a trained model; set init_from to its checkpoint")
        apply_lora(model, LoRAConfig(**config["lora"]))
    return model


def build_token_data(config: dict[str, Any], tokenizer: BPETokenizer, out_dir: Path,
                     documents: list[str] | None) -> TokenShards:
    """The run's token shards in `out_dir/data`, reused when they hold this corpus and tokenizer."""
    shard_dir = out_dir / "data"
    if documents is not None:
        data = config["data"]
        stamp = {"builtin": [int(data["num_documents"]), config["seed"], data["lang"]]}
        if (shard_dir / "meta.json").is_file():
            shards = TokenShards(shard_dir)
            if shards.fingerprint == tokenizer.fingerprint() and shards.meta.get("source_stamp") == stamp:
                return shards
        write_token_shards(documents, tokenizer, shard_dir, source="builtin")
        meta = json.loads((shard_dir / "meta.json").read_text(encoding="utf-8"))
        atomic_write_json(shard_dir / "meta.json", {**meta, "source_stamp": stamp})
        return TokenShards(shard_dir)
    return tokenize_corpus(config["data"]["source"], tokenizer, shard_dir, config["data"]["text_field"])


def training_config(config: dict[str, Any]) -> TrainingConfig:
    shared = {key: config[key] for key in SHARED_TRAINING_KEYS}
    return TrainingConfig(**{**config["training"], **shared, "out_dir": str(config["out_dir"])})


# ---------------------------------------------------------------------------------------- the run
@dataclass
class PreparedRun:
    config: dict[str, Any]
    tokenizer: BPETokenizer
    model: MiniGPT
    train_set: Dataset
    val_set: Dataset | None
    trainer: Trainer


def prepare_run(config: dict[str, Any]) -> PreparedRun:
    """Everything a run needs, built and checked before the first step: a bad corpus, tokenizer or
    model config fails here, not half-way through training."""
    ctx = dist_utils.init_distributed(config["distributed"])
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    torch.manual_seed(config["seed"])
    if ctx.world_size > 1 and not ctx.is_main:
        dist_utils.barrier()  # rank 0 writes the tokenizer and token shards first; the others then reuse them
    try:
        tokenizer, train_set, val_set = prepare_data(config)
    finally:
        if ctx.world_size > 1 and ctx.is_main:
            dist_utils.barrier()
    model = build_model(config, tokenizer)
    _check_fits(config, model, tokenizer)
    if config["stage"] in ("sft", "dpo", "reward", *RL_STAGES):
        logger.info("model: %.2fM parameters; %d training and %d validation examples",
                    model.num_parameters() / 1e6, len(train_set), len(val_set) if val_set else 0)
    else:
        logger.info("model: %.2fM parameters; data: %d training tokens, %d validation tokens",
                    model.num_parameters() / 1e6, train_set.num_tokens(), val_set.num_tokens() if val_set else 0)
    options = {"memory": MemoryConfig(**config["memory"])}
    if config["stage"] in ("dpo", "reward", *RL_STAGES):
        options.update({**OBJECTIVE_OPTIONS[config["stage"]], **config["objective"]})
    if config["stage"] in RL_STAGES:
        trainer_class: type[Trainer] = PPOTrainer if config["stage"] == "ppo" else GRPOTrainer
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        functions, weights = reward_functions(config, tokenizer, device)
        trainer = trainer_class(model, tokenizer, training_config(config), prompts=train_set,
                                eval_prompts=val_set, reward_functions=functions, reward_weights=weights,
                                rollout=RolloutConfig(**config["rollout"]), **options)
        return PreparedRun(config, tokenizer, model, train_set, val_set, trainer)
    if config["stage"] in ("dpo", "reward"):
        trainer_class = DPOTrainer if config["stage"] == "dpo" else RewardTrainer
    else:
        trainer_class = SFTTrainer if config["stage"] == "sft" else PreTrainer
    trainer = trainer_class(model, tokenizer, training_config(config), train_data=train_set, eval_data=val_set,
                            **options)
    return PreparedRun(config, tokenizer, model, train_set, val_set, trainer)


def prepare_data(config: dict[str, Any]) -> tuple[BPETokenizer, Dataset, Dataset | None]:
    """The run's tokenizer and its training and validation sets (token windows for pretraining,
    conversations for SFT, preference pairs for DPO and reward models)."""
    data = config["data"]
    if config["stage"] in RL_STAGES:
        tokenizer = build_tokenizer(config, None)
        prompts = load_rl_prompts(config)
        n_val = int(len(prompts) * data["val_fraction"])
        return tokenizer, prompts[n_val:], (prompts[:n_val] or None)
    if config["stage"] in ("dpo", "reward"):
        pairs = load_preference_pairs(config)
        tokenizer = build_tokenizer(config, None)
        return (tokenizer, *_split_examples(pairs, PreferenceDataset, tokenizer, data))
    if config["stage"] == "sft":
        conversations = load_conversations(config)
        if not config["init_from"]:
            logger.warning("stage sft without init_from: fine-tuning a randomly initialised model")
        tokenizer = build_tokenizer(config, [m.content for c in conversations for m in c.messages])
        return (tokenizer, *_split_examples(conversations, ConversationDataset, tokenizer, data))
    documents = None
    if data["source"] == "builtin":
        documents = builtin_corpus(int(data["num_documents"]), seed=config["seed"], lang=data["lang"])
    tokenizer = build_tokenizer(config, documents)
    tokens = build_token_data(config, tokenizer, Path(config["out_dir"]), documents)
    train_set, val_set = split_train_val(tokens, data["max_length"], data["val_fraction"], tokenizer)
    return tokenizer, train_set, val_set


def _split_examples(examples: list[Any], dataset: type, tokenizer: BPETokenizer,
                    data: dict[str, Any]) -> tuple[Dataset, Dataset | None]:
    """Training and validation datasets: the first `val_fraction` of the (shuffled) examples validate."""
    n_val = int(len(examples) * data["val_fraction"])
    val = dataset(examples[:n_val], tokenizer, data["max_length"]) if n_val else None
    return dataset(examples[n_val:], tokenizer, data["max_length"]), val


def load_preference_pairs(config: dict[str, Any]) -> list[PreferencePair]:
    data = config["data"]
    if data["source"] == "builtin":
        return builtin_preference_pairs(int(data["num_documents"]), seed=config["seed"], lang=data["lang"])
    pairs = load_records(data["source"], kind="preference", skip_bad=data["skip_bad"]).records
    random.Random(config["seed"]).shuffle(pairs)
    return pairs


def load_rl_prompts(config: dict[str, Any]) -> list[PromptRecord]:
    """Prompts for PPO/GRPO: the built-in word problems (with their `answer`), or `{"prompt", …}` records."""
    data = config["data"]
    if data["source"] == "builtin":
        return as_prompt_records(builtin_rl_prompts(int(data["num_documents"]), seed=config["seed"], lang=data["lang"]))
    prompts = load_records(data["source"], kind="prompt", skip_bad=data["skip_bad"]).records
    random.Random(config["seed"]).shuffle(prompts)
    return prompts


def reward_functions(config: dict[str, Any], tokenizer: BPETokenizer,
                     device: torch.device) -> tuple[list[Any], list[float] | None]:
    """The run's reward functions: `reward.functions` (default ["answer"] without a reward model), then
    the reward model of `reward.model` if given."""
    spec = config["reward"]
    names = spec["functions"] if spec["functions"] is not None else ([] if spec["model"] else ["answer"])
    try:
        functions: list[Any] = [resolve_reward_function(name) for name in names]
    except ValueError as e:
        raise RunConfigError(f"reward.functions: {e}") from None
    if spec["model"]:
        path = resolve_checkpoint(spec["model"])
        if not is_reward_checkpoint(path):
            raise RunConfigError(f"reward.model: {path} is not a reward model checkpoint (train one with "
                                 "stage: reward)")
        reward_model = MiniGPTRewardModel.from_base(path, device=device)
        autocast_dtype = resolve_precision(config["precision"], device)
        autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else None
        functions.append(RewardModelScorer(reward_model, tokenizer, autocast=autocast))
    weights = spec["weights"]
    if weights is not None and len(weights) != len(functions):
        raise RunConfigError(f"reward.weights has {len(weights)} entries for {len(functions)} reward functions")
    return functions, weights


def load_conversations(config: dict[str, Any]) -> list[Conversation]:
    data = config["data"]
    if data["source"] == "builtin":
        identity = Identity(**data["identity"]) if data["identity"] else None
        return builtin_sft_conversations(int(data["num_documents"]), seed=config["seed"], lang=data["lang"],
                                         identity=identity)
    conversations = load_records(data["source"], kind="conversation", skip_bad=data["skip_bad"]).records
    random.Random(config["seed"]).shuffle(conversations)
    return conversations


def _check_fits(config: dict[str, Any], model: MiniGPT, tokenizer: BPETokenizer) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise RunConfigError(f"tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                             f"{model.config.vocab_size}")
    if config["stage"] not in RL_STAGES and config["data"]["max_length"] > model.config.max_position_embeddings:
        raise RunConfigError(f"data.max_length={config['data']['max_length']} exceeds the model's "
                             f"max_position_embeddings={model.config.max_position_embeddings}")


_TIKTOKEN_VOCAB = {"gpt2": 50257, "cl100k_base": 100277}


def run_model_config(config: dict[str, Any], tokenizer: BPETokenizer | None = None) -> MiniGPTConfig:
    """The model config a run trains: sized to `tokenizer`, or, without one (`--dry-run`), from the run
    config alone (no model, no data, no download)."""
    if config["init_from"]:
        return load_config(resolve_checkpoint(config["init_from"]))
    fields = dict(config["model"])
    preset = fields.pop("preset", None) or "tiny"
    if tokenizer is not None:
        fields.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return MiniGPTConfig.from_preset(preset, **fields)
    if "vocab_size" not in fields:
        path = config["tokenizer"]["path"]
        if path in _TIKTOKEN_VOCAB and not Path(path).exists():
            fields["vocab_size"] = _TIKTOKEN_VOCAB[path]
        elif path:
            try:
                fields["vocab_size"] = len(load_tokenizer(path))
            except TokenizerLoadError as e:
                raise RunConfigError(f"tokenizer.path: {e}") from None
        else:
            fields["vocab_size"] = int(config["tokenizer"]["vocab_size"])  # the tokenizer to be trained
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return MiniGPTConfig.from_preset(preset, **fields)


def estimate_run_memory(config: dict[str, Any], device: str | None = None) -> MemoryEstimate:
    """`minillm train --dry-run`: the memory one training step of this run needs, before allocating it."""
    model_config = run_model_config(config)
    training = training_config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_precision(training.precision, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    memory = MemoryConfig(**config["memory"])
    return estimate_memory(model_config, memory.micro_batch_size or training.batch_size,
                           int(config["data"]["max_length"]), precision=precision,
                           gradient_checkpointing=model_config.gradient_checkpointing or memory.gradient_checkpointing,
                           optimizer=training.optimizer)


RESULT_FILE = "result.json"


def run_stage(config: dict[str, Any]) -> dict[str, Any]:
    """Run `config` as one stage of a pipeline: once it finished it wrote `out_dir/result.json` and is not
    run again (its result is read back); once stopped it resumes from its newest checkpoint."""
    out_dir = Path(config["out_dir"])
    done = out_dir / RESULT_FILE
    if done.is_file():
        logger.info("%s: already done (%s); skipped", out_dir, done)
        return json.loads(done.read_text(encoding="utf-8"))
    config = copy.deepcopy(config)
    checkpoint = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if checkpoint is not None:
        logger.info("%s: resumes from %s", out_dir, checkpoint)
        config["resume"] = str(checkpoint)
    result = run_training(config)
    atomic_write_json(done, result)
    return result


def run_training(config: dict[str, Any]) -> dict[str, Any]:
    """Run the stage described by `config` (see `load_run_config`); returns the final metrics."""
    started = time.time()
    run = prepare_run(config)
    if config["resume"]:
        checkpoint = (latest_checkpoint(config["out_dir"]) if config["resume"] == "latest"
                      else Path(config["resume"]))
        if checkpoint is None:
            raise RunConfigError(f"resume=latest: no checkpoint with training state in {config['out_dir']}")
        run.trainer.resume(checkpoint)
    result = run.trainer.train()
    if hasattr(run.train_set, "num_tokens"):
        result["train_tokens"] = int(run.train_set.num_tokens())
    result.update(out_dir=str(config["out_dir"]), parameters=run.model.num_parameters(),
                  total_seconds=round(time.time() - started, 1))
    return result
