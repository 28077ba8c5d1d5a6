"""Run options of the one Trainer: LoRA runs, early stopping, memory options, optimizer offload, compile."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from minillm.cli import main
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from minillm.training import trainer as trainer_module
from minillm.training.memory import MemoryConfig
from minillm.training.trainer import Trainer

PRETRAIN = ["--preset", "tiny", "--data", "builtin", "--max-steps", "30", "--max-length", "64", "--batch-size", "8",
            "--precision", "fp32", "eval_every=0", "data.num_documents=400", "tokenizer.vocab_size=400",
            "training.progress=false"]
SFT = ["stage=sft", "--max-steps", "8", "--max-length", "96", "--batch-size", "8", "--precision", "fp32",
       "--lr", "5e-3", "eval_every=4", "save_every=4", "data.num_documents=200", "training.warmup_steps=0",
       "training.log_every=1", "training.progress=false", "lora.rank=4", "lora.alpha=8"]


class Windows(Dataset):
    """Learnable windows: each counts up by one from a random start (mod 120)."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        starts = torch.randint(0, 120, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(24)) % 120

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def small_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["train", *PRETRAIN, "--out-dir", str(out)]) == 0
    return out / "final"


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_lora_run_trains_adapters_only_and_saves_merged_and_adapter_checkpoints(pretrained, tmp_path):
    out = tmp_path / "lora"
    assert main(["train", *SFT, "--out-dir", str(out), f"init_from={pretrained}"]) == 0
    base, final = _weights(pretrained), _weights(out / "final")
    # the merged final/ differs from the base only in the adapted projections
    changed = sorted(k for k in base if not torch.equal(base[k], final[k]))
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for k in changed)
    assert (out / "final" / ADAPTER_WEIGHTS_FILE).is_file() and (out / "final" / ADAPTER_CONFIG_FILE).is_file()
    # rolling checkpoints hold the adapter only, and still load (base + adapter, merged)
    step = out / "step_4"
    assert not (step / "model.safetensors").exists()
    assert (step / ADAPTER_WEIGHTS_FILE).stat().st_size < (pretrained / "model.safetensors").stat().st_size / 5
    model = MiniGPT.from_pretrained(step)
    assert not any("lora" in name for name, _ in model.named_parameters())
    # the loss on assistant tokens fell
    records = [eval(line.replace("null", "None")) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0]
    # resumed from the adapter-only step_4/, the run ends where the uninterrupted one did
    resumed = tmp_path / "resumed"
    assert main(["train", *SFT, "--out-dir", str(resumed), f"init_from={pretrained}", "--resume", str(step)]) == 0
    again = _weights(resumed / "final")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_lora_without_a_trained_model_is_refused(tmp_path, capsys):
    assert main(["train", *PRETRAIN, "--out-dir", str(tmp_path), "lora.rank=4"]) == 2
    assert "lora adapts a trained model: set init_from" in capsys.readouterr().err


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    trainer = Trainer(small_model(), train_data=Windows(), eval_data=Windows(16, seed=1), max_steps=20,
                      batch_size=8, lr=1e-9, warmup_steps=0, eval_every=1, eval_batches=0,
                      early_stopping_patience=2, early_stopping_min_delta=1e-3, precision="fp32",
                      progress=False, out_dir=str(tmp_path))
    result = trainer.train()
    # evaluation 1 improves on nothing-yet; evaluations 2 and 3 do not beat it by 1e-3: stop at step 3
    assert result["stopped_early"] and result["steps"] == 3
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "best").is_dir()


def test_early_stopping_lets_an_improving_run_finish():
    trainer = Trainer(small_model(), train_data=Windows(), eval_data=Windows(16, seed=1), max_steps=12,
                      batch_size=8, lr=1e-2, warmup_steps=0, eval_every=2, eval_batches=0,
                      early_stopping_patience=1, precision="fp32", progress=False)
    result = trainer.train()
    assert result["steps"] == 12 and "stopped_early" not in result


def test_memory_config_sets_batching_and_checkpointing():
    model = small_model()
    trainer = Trainer(model, train_data=Windows(), max_steps=1, batch_size=16, progress=False,
                      memory=MemoryConfig(gradient_checkpointing=True, micro_batch_size=4, grad_accum_steps=4))
    assert (trainer.config.batch_size, trainer.config.grad_accum_steps) == (4, 4)
    assert model.gradient_checkpointing
    assert trainer.train()["tokens"] == 16 * 24


def test_optimizer_offload_gives_the_same_weights(monkeypatch):
    """The host-side master copies and AdamW step reproduce the plain update (forced on, since on a CPU
    there is no host to offload to)."""
    def train(offload: bool) -> dict[str, torch.Tensor]:
        model = small_model()
        trainer = Trainer(model, train_data=Windows(), max_steps=5, batch_size=8, lr=1e-2, warmup_steps=0,
                          precision="fp32", progress=False, optimizer_offload=offload)
        trainer.train()
        assert (trainer._offload is not None) == offload
        if offload:  # AdamW's state lives on the master copies, not on the model's parameters
            state_params = set(map(id, trainer.optimizer.state))
            assert state_params == set(map(id, trainer._offload.masters))
            assert not state_params & set(map(id, model.parameters()))
        return {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(trainer_module, "offload_useful", lambda device: True)
    plain, offloaded = train(False), train(True)
    for key in plain:
        torch.testing.assert_close(offloaded[key], plain[key], atol=1e-6, rtol=0)


def test_fsdp_refuses_combinations_it_cannot_do():
    with pytest.raises(ValueError, match="precision=fp16 with distributed=fsdp"):
        Trainer(small_model(), train_data=Windows(), precision="fp16", distributed="fsdp", progress=False)


@pytest.mark.slow
def test_compile_matches_eager():
    results = {}
    for compiled in (False, True):
        model = small_model()
        trainer = Trainer(model, train_data=Windows(), max_steps=4, batch_size=8, lr=1e-3, warmup_steps=0,
                          precision="fp32", progress=False, compile=compiled)
        results[compiled] = (trainer.train()["train_loss"], {k: v.clone() for k, v in model.state_dict().items()})
        assert not any("_orig_mod" in k for k in model.state_dict())  # checkpoints keep the plain names
    assert abs(results[True][0] - results[False][0]) < 1e-4
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, atol=1e-4, rtol=0)
