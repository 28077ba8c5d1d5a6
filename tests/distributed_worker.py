"""Launched by tests/test_distributed.py: `torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py
MODE OUT [ACCUM]` (MODE: ddp | fsdp), or `python tests/distributed_worker.py none OUT [ACCUM]` for the one-process
reference. Trains a small seeded MiniGPT for STEPS steps on a global batch of 8 items in fp32 with a loop
that mirrors `Trainer._optimizer_step` (loss sum / global item count, clip, AdamW) and writes, on rank 0,
`losses.json` (the global mean loss per step) and `final/` (the full weights via `save_pretrained`);
every rank writes `loader_rank{R}.json` (its resume position)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from minillm.data.loader import BatchLoader
from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import MiniGPT
from minillm.training import distributed as D
from minillm.training.objectives import LanguageModelingObjective

STEPS = 5
GLOBAL_BATCH = 8
SEQ = 16


class ToyData(Dataset):
    """Seeded token windows; each item masks a different number of labels, so the ranks' item counts
    differ and only a global normaliser gives the one-process loss."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(123)
        self.ids = torch.randint(1, 97, (n, SEQ), generator=g)
        self.keep = torch.randint(3, SEQ + 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[self.keep[i]:] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def main(mode: str, out: Path, accum: int = 1) -> None:
    ctx = D.init_distributed(mode, "cpu")
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, tie_word_embeddings=True)
    model = D.wrap_model(MiniGPT(config), mode, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    micro = GLOBAL_BATCH // accum // ctx.world_size
    loader = D.shard_loader(BatchLoader(ToyData(), micro, shuffle=True, seed=7), ctx)
    objective = LanguageModelingObjective()

    def batches():
        while True:
            yield from loader

    stream = batches()
    losses = []
    for _ in range(STEPS):
        micro_batches = [next(stream) for _ in range(accum)]
        items = D.global_count(sum(objective.count(b) for b in micro_batches))
        scale = D.loss_scale(model) / max(items, 1)
        loss_total = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            with D.grad_sync(model, sync=i == len(micro_batches) - 1):
                result = objective(model, batch)
                (result.loss_sum * scale).backward()
            loss_total += result.loss_sum.detach() / max(items, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        assert math.isfinite(float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(D.all_reduce_sum(loss_total)))

    plain = D.unwrapped_copy(model)  # collective under FSDP
    out.mkdir(parents=True, exist_ok=True)
    (out / f"loader_rank{ctx.rank}.json").write_text(json.dumps(loader.state_dict()))
    if D.is_main():
        plain.save_pretrained(out / "final")
        (out / "losses.json").write_text(json.dumps(losses))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
