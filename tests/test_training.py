"""The Trainer: learning, accumulation, schedule, optimizer groups, checkpoints, the original quickstart."""

import contextlib
import io
import json
import logging
import math
import shutil
import textwrap

import numpy as np
import pytest
import torch

from minillm.checkpoint_files import resolve_checkpoint
from minillm.data.pretrain import LanguageModelingDataset, TokenShards, split_train_val, write_token_shards
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.training import PreTrainer, TrainingConfig, resolve_precision
from minillm.training.checkpoint import save_checkpoint
from minillm.training.schedule import lr_multiplier

ORIGINAL_QUICKSTART = textwrap.dedent('''
    import torch
    from torch.utils.data import DataLoader
    from minillm.model.config import get_tiny_config
    from minillm.model.transformer import MiniGPT
    from minillm.tokenizer.bpe_tokenizer import BPETokenizer
    from minillm.training.trainer import LanguageModelingDataset, PreTrainer
    from minillm.inference.generator import TextGenerator, GenerationConfig

    texts = ["你好，Mini-LLM!", "Transformer 架构演示", "小模型也能训练"]
    tokenizer = BPETokenizer(vocab_size=256)
    tokenizer.train(texts)
    dataset = LanguageModelingDataset(texts, tokenizer, max_length=64)
    dataloader = DataLoader(dataset, batch_size=2)
    model = MiniGPT(get_tiny_config())
    trainer = PreTrainer(model, tokenizer, device="cpu")
    loss = trainer.train_epoch(dataloader)
    print(f"epoch loss: {loss:.4f}")

    generator = TextGenerator(model, tokenizer)
    prompt_ids = tokenizer.encode("Mini-LLM", add_special_tokens=True)
    output_ids = generator.sample_generate(input_ids=torch.tensor([prompt_ids]),
                                           config=GenerationConfig(max_length=40, top_p=0.9))
    print(tokenizer.decode(output_ids[0].tolist()))
''')


def test_the_original_quickstart_runs_as_written(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="minillm.tokenizer"), contextlib.redirect_stdout(out):
        exec(compile(ORIGINAL_QUICKSTART, "original_quickstart", "exec"), {})
    lines = out.getvalue().splitlines()
    loss = float(lines[0].removeprefix("epoch loss: "))
    assert math.isfinite(loss) and 0 < loss < 10
    assert lines[1].startswith("<|endoftext|>Mini-LLM")  # the prompt with its BOS, then the sample
    warnings = [r.getMessage() for r in caplog.records]
    assert any("vocab_size=256 is too small" in w and "320" in w for w in warnings)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> MiniGPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    return MiniGPT(MiniGPTConfig(**{**config, **overrides}))


def unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_training_on_the_builtin_corpus_beats_the_unigram_entropy(tmp_path, corpus, tokenizer):
    write_token_shards(corpus, tokenizer, tmp_path / "shards")
    shards = TokenShards(tmp_path / "shards")
    train, val = split_train_val(shards, max_length=64, val_fraction=0.05, tokenizer=tokenizer)
    entropy = unigram_entropy(shards.slice(0, train.end))
    trainer = PreTrainer(tiny_model(len(tokenizer)), tokenizer, train_data=train, eval_data=val,
                         max_steps=200, batch_size=16, lr=3e-3, warmup_steps=20, eval_batches=0,
                         precision="fp32", progress=False)
    before = trainer.evaluate()["val_loss"]
    result = trainer.train()
    print(f"val loss {before:.3f} -> {result['val_loss']:.3f}; unigram entropy {entropy:.3f}")
    assert before > entropy  # a random model is worse than counting tokens
    assert result["val_loss"] < 0.6 * entropy


def test_gradient_accumulation_equals_one_large_batch(tokenizer):
    # 16 windows of 32 tokens, the last one short, so micro-batches hold different numbers of tokens.
    dataset = LanguageModelingDataset(np.arange(15 * 31 + 11) % len(tokenizer), tokenizer, max_length=32)
    assert len(dataset) == 16 and (dataset[15]["labels"] == -100).any()
    weights = []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        # fp64: in fp32, Adam's division by sqrt(v) magnifies summation-order rounding to ~1e-6 on a few weights.
        model = tiny_model(len(tokenizer), seed=1).double()
        trainer = PreTrainer(model, tokenizer, train_data=dataset, batch_size=batch_size, grad_accum_steps=accum,
                             max_steps=2, warmup_steps=0, precision="fp32", progress=False, seed=5)
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights[2], weights[0], atol=1e-6, rtol=0)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    values = [lr_multiplier(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(130)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[110] == values[129] == pytest.approx(0.1)


def test_weight_decay_skips_norms_biases_and_embeddings(tokenizer):
    model = tiny_model(len(tokenizer), qkv_bias=True)
    trainer = PreTrainer(model, tokenizer, train_data=LanguageModelingDataset(np.arange(200), tokenizer, 16),
                         progress=False)
    trainer._setup_optimizer(10)
    decayed, plain = (set(map(id, g["params"])) for g in trainer.optimizer.param_groups)
    for name, p in model.named_parameters():
        expected_decay = p.dim() == 2 and "embed" not in name
        assert (id(p) in decayed) == expected_decay, name
        assert (id(p) in plain) != expected_decay, name


def test_run_saves_best_and_final_as_loadable_model_directories(tmp_path, corpus, tokenizer):
    data = LanguageModelingDataset(corpus[:300], tokenizer, max_length=64)
    model = tiny_model(len(tokenizer))
    trainer = PreTrainer(model, tokenizer, train_data=data, eval_data=data, max_steps=6, eval_every=3,
                         log_every=2, out_dir=str(tmp_path / "run"), progress=False, precision="fp32")
    trainer.train()
    for name in ("best", "final"):
        directory = tmp_path / "run" / name
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"} <= {p.name for p in directory.iterdir()}
        assert BPETokenizer.from_pretrained(directory).encode("小明有3个苹果") == tokenizer.encode("小明有3个苹果")
    loaded = MiniGPT.from_pretrained(tmp_path / "run" / "final").eval()
    ids = torch.tensor([tokenizer.encode("Tom has 3 apples.")])
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_records)
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, tokenizer, monkeypatch):
    model = tiny_model(len(tokenizer))
    save_checkpoint(tmp_path / "final", model, tokenizer)
    before = (tmp_path / "final" / "model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(MiniGPT, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "final", model, tokenizer)
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary directory left behind
    # A crash between moving the old checkpoint aside and renaming the new one in: the old copy is found.
    shutil.move(tmp_path / "final", tmp_path / "final.old")
    assert resolve_checkpoint(tmp_path / "final") == tmp_path / "final.old"


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainingConfig(precision="fp8")


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(max_steps=0), "max_steps"),
    (dict(lr=-1.0), "lr"),
    (dict(warmup_steps=-5), "warmup_steps"),
])
def test_invalid_training_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_unknown_trainer_option_is_refused(tokenizer):
    with pytest.raises(TypeError, match="learning_rate"):
        PreTrainer(tiny_model(len(tokenizer)), tokenizer, learning_rate=1e-3)
