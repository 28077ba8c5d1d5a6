"""A training run from a YAML config (or flags): tokenizer → data → model → `Trainer` → checkpoints.

The run config and its schema are in `run_config.py`: it is loaded and checked (every key, type and
range) before anything here reads data.

Under `torchrun --nproc_per_node=N -m minillm train …` with `distributed: ddp|fsdp`, rank 0 prepares the
tokenizer and the token shards while the other ranks wait, then every rank loads them; `batch_size` is
per process, so the global batch is batch_size × grad_accum_steps × N.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from minillm.checkpoint_files import resolve_checkpoint
from minillm.data.builtin import (
    Identity,
    builtin_corpus,
    builtin_preference_pairs,
    builtin_rl_prompts,
    builtin_sft_conversations,
)
from minillm.data.corpus import sample_documents
from minillm.data.formats import Conversation, PreferencePair, PromptRecord, load_records
from minillm.data.preference import PreferenceDataset
from minillm.data.pretrain import (
    TokenShards,
    reusable_shards,
    split_train_val,
    stamp_shards,
    tokenize_corpus,
    write_token_shards,
)
from minillm.data.sft import ConversationDataset
from minillm.device import resolve_device
from minillm.io import atomic_write_json, atomic_write_text, cache_root
from minillm.model.config import MiniGPTConfig
from minillm.model.heads import MiniGPTRewardModel, MiniGPTWithValueHead, is_reward_checkpoint
from minillm.model.lora import LoRAConfig, apply_lora
from minillm.model.transformer import MiniGPT, load_config
from minillm.recipes.config import RL_STAGES, SHARED_TRAINING_KEYS, RunConfigError, objective_options
from minillm.rl.grpo import GRPOTrainer
from minillm.rl.ppo import PPOTrainer
from minillm.rl.reward import RewardModelScorer, resolve_reward_function
from minillm.rl.rollout import RolloutConfig, as_prompt_records
from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.manager import TokenizerManager
from minillm.tokenizer.pretrained import TokenizerLoadError, load_tokenizer
from minillm.training import distributed as dist_utils
from minillm.training.checkpoint import STEP_PREFIX, latest_checkpoint
from minillm.training.memory import GB, MemoryConfig, MemoryEstimate, device_capacity, estimate_memory
from minillm.training.precision import resolve_precision
from minillm.training.stages import DPOTrainer, RewardTrainer
from minillm.training.trainer import PreTrainer, SFTTrainer, Trainer, TrainingConfig

logger = logging.getLogger("minillm.training")

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
    # A sample of the data: the first `train_documents` documents, each cut to a bounded length (see
    # `sample_documents`), so that neither a huge document nor a huge corpus has to fit in memory.
    source = config["data"]["source"]
    if documents is not None:
        sample = documents[: spec["train_documents"]]
    else:
        sample = sample_documents(source, config["data"]["text_field"], max_documents=spec["train_documents"])
    return TokenizerManager(cache_dir()).get_or_train(sample, int(spec["vocab_size"]), source=str(source))


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
        shards = reusable_shards(shard_dir, tokenizer, stamp)
        if shards is None:
            write_token_shards(documents, tokenizer, shard_dir, source="builtin")
            shards = stamp_shards(shard_dir, stamp)
        return shards
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
    check_run_fits(config)
    ctx = dist_utils.init_distributed(config["distributed"])
    out_dir = Path(config["out_dir"])
    if ctx.is_main:
        check_run_dir(config)
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
        options.update({**objective_options(config["stage"]), **config["objective"]})
    if config["stage"] in RL_STAGES:
        trainer_class: type[Trainer] = PPOTrainer if config["stage"] == "ppo" else GRPOTrainer
        device = resolve_device("auto")
        functions, weights = reward_functions(config, tokenizer, device)
        try:
            trainer = trainer_class(model, tokenizer, training_config(config), prompts=train_set,
                                    eval_prompts=val_set, reward_functions=functions, reward_weights=weights,
                                    rollout=RolloutConfig(**config["rollout"]), **options)
        except (TypeError, ValueError) as e:  # too few prompts for a rollout, a group size below 2, …
            raise RunConfigError(f"stage {config['stage']}: {e}") from None
        return PreparedRun(config, tokenizer, model, train_set, val_set, trainer)
    if config["stage"] in ("dpo", "reward"):
        trainer_class = DPOTrainer if config["stage"] == "dpo" else RewardTrainer
    else:
        trainer_class = SFTTrainer if config["stage"] == "sft" else PreTrainer
    try:
        trainer = trainer_class(model, tokenizer, training_config(config), train_data=train_set, eval_data=val_set,
                                **options)
    except (TypeError, ValueError) as e:  # a combination of options the trainer refuses (fsdp with LoRA, …)
        raise RunConfigError(f"stage {config['stage']}: {e}") from None
    return PreparedRun(config, tokenizer, model, train_set, val_set, trainer)


# What a run writes in its directory, replaced when a new run starts there with `overwrite` (the token shards
# in data/ are kept: they are reused when they match).
_RUN_OUTPUTS = ("final", "best", "metrics.jsonl", "plots", "tensorboard", "result.json")


def check_run_dir(config: dict[str, Any]) -> None:
    """A new run (not `resume`) in a directory that holds another run's checkpoints is refused, since it
    would replace them; with `overwrite: true` that run's checkpoints, metrics and plots are deleted first."""
    out_dir = Path(config["out_dir"])
    if config["resume"] or not out_dir.is_dir():
        return
    found = sorted(p for p in out_dir.iterdir() if p.name in _RUN_OUTPUTS[:2] or (
        p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()))
    if not found:
        return
    if not config["overwrite"]:
        names = ", ".join(f"{p.name}/" for p in found[:3]) + (", …" if len(found) > 3 else "")
        raise RunConfigError(f"out_dir {out_dir} already holds a run ({names}); continue it with --resume, choose "
                             "another --out-dir, or pass --overwrite to start again there (its checkpoints, "
                             "metrics and plots are deleted)")
    for path in [*found, *(out_dir / name for name in _RUN_OUTPUTS[2:])]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.info("--overwrite: removed the previous run's outputs in %s", out_dir)


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


_TIKTOKEN_VOCAB = {"gpt2": 50257, "cl100k_base": 100277}


def run_model_config(config: dict[str, Any], tokenizer: BPETokenizer | None = None) -> MiniGPTConfig:
    """The model config a run trains: sized to `tokenizer`, or, without one (`--dry-run`), from the run
    config alone (no model, no data, no download)."""
    if config["init_from"]:
        return load_config(resolve_checkpoint(config["init_from"]))
    fields = dict(config["model"])
    preset = fields.pop("preset", None) or "tiny"
    if tokenizer is not None:
        if fields.get("vocab_size", len(tokenizer)) != len(tokenizer):
            raise RunConfigError(f"model.vocab_size={fields['vocab_size']} disagrees with the tokenizer, which has "
                                 f"{len(tokenizer)} tokens; remove model.vocab_size (it is taken from the tokenizer) "
                                 f"or set tokenizer.vocab_size={fields['vocab_size']}")
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


def check_run_fits(config: dict[str, Any], estimate: MemoryEstimate | None = None) -> MemoryEstimate | None:
    """Refuse a run whose model cannot take its windows, or whose one training step needs more memory than
    the device has at all (it could only crash later); checked before any data is read."""
    if config["stage"] in RL_STAGES:
        return None
    model_config = run_model_config(config)
    if config["data"]["max_length"] > model_config.max_position_embeddings:
        raise RunConfigError(f"data.max_length={config['data']['max_length']} exceeds the model's "
                             f"max_position_embeddings={model_config.max_position_embeddings}")
    estimate = estimate or estimate_run_memory(config)
    device = resolve_device("auto")
    capacity = device_capacity(device)
    if capacity is not None and estimate.total > capacity:
        raise RunConfigError(
            f"one training step needs about {estimate.total / GB:.1f} GB (batch {estimate.batch_size} × "
            f"data.max_length={estimate.seq_len} tokens) but the {device.type} has {capacity / GB:.1f} GB; lower "
            "data.max_length or training.batch_size, or set memory.gradient_checkpointing=true or "
            "memory.micro_batch_size (see --dry-run)")
    return estimate


def estimate_run_memory(config: dict[str, Any], device: str | None = None) -> MemoryEstimate:
    """`minillm train --dry-run`: the memory one training step of this run needs, before allocating it."""
    model_config = run_model_config(config)
    training = training_config(config)
    device = resolve_device(device)
    dtype = resolve_precision(training.precision, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    memory = MemoryConfig(**config["memory"])
    return estimate_memory(model_config, memory.micro_batch_size or training.batch_size,
                           int(config["data"]["max_length"]), precision=precision,
                           gradient_checkpointing=memory.gradient_checkpointing,
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
    else:
        config["overwrite"] = True  # the stage's own directory: what a stop left there (best/) is replaced
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
