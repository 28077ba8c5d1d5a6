"""Launched by tests/test_distributed.py: `torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py
MODE OUT [ACCUM]` (MODE: ddp | fsdp), or `python tests/distributed_worker.py none OUT [ACCUM]` for the one-process
reference.

Trains a small seeded MiniGPT with the `Trainer` for STEPS steps on a global batch of 8 items (per-process
micro-batch 8 / ACCUM / ranks) in fp32, with clipping and a validation pass, saving `step_3/` on the way
and `final/` at the end (metrics.jsonl holds the loss curve). Then a second `Trainer`, built afresh,
resumes from `step_3/` into OUT/resumed and trains to the same end."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import MiniGPT
from minillm.training import distributed as D
from minillm.training.trainer import Trainer, TrainingConfig

STEPS = 5
GLOBAL_BATCH = 8
SEQ = 16


class ToyData(Dataset):
    """Seeded token windows; each item masks a different number of labels, so the ranks' item counts
    differ and only a global normaliser gives the one-process loss."""

    def __init__(self, n: int = 40, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 97, (n, SEQ), generator=g)
        self.keep = torch.randint(3, SEQ + 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[self.keep[i]:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def trainer(mode: str, out: Path, accum: int, optimizer: str = "adamw") -> Trainer:
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, tie_word_embeddings=True))
    world = int(__import__("os").environ.get("WORLD_SIZE", 1)) if mode != "none" else 1
    config = TrainingConfig(batch_size=GLOBAL_BATCH // accum // world, grad_accum_steps=accum, max_steps=STEPS,
                            lr=1e-2, warmup_steps=0, grad_clip=0.5, eval_every=0, eval_batches=0,
                            save_every=3, keep_last=1, log_every=1, out_dir=str(out), seed=7,
                            precision="fp32", progress=False, distributed=mode, optimizer=optimizer,
                            muon_lr=0.02)
    return Trainer(model, config=config, train_data=ToyData(), eval_data=ToyData(12, seed=5))


def main(mode: str, out: Path, accum: int = 1, optimizer: str = "adamw") -> None:
    first = trainer(mode, out, accum, optimizer)
    first.train()
    second = trainer(mode, out / "resumed", accum, optimizer)
    second.resume(out / "step_3")
    second.train()
    D.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1,
         sys.argv[4] if len(sys.argv) > 4 else "adamw")
