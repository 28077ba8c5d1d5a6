"""DDP and FSDP2 on CPU (gloo, 2 processes under torchrun) give the one-process run on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from minillm.data.loader import BatchLoader
from minillm.model.transformer import WEIGHTS_FILE, MiniGPT
from minillm.training import distributed as D

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple[int, str], Path]:
    """The one-process runs (global batch 8), with and without gradient accumulation, AdamW and Muon."""
    runs = {}
    for accum, optimizer in ((1, "adamw"), (2, "adamw"), (1, "muon")):
        out = tmp_path_factory.mktemp(f"single{accum}{optimizer}")
        _run([sys.executable, str(WORKER), "none", str(out), str(accum), optimizer])
        runs[accum, optimizer] = out
    return runs


def _curve(run: Path) -> list[float]:
    """Training loss per step, then the final validation loss, from metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [r["val_loss"] for r in records if "val_loss" in r]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / WEIGHTS_FILE))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _loader_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state" / "state.json").read_text())["loader"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize(("mode", "accum", "optimizer"), [
    ("ddp", 1, "adamw"), ("fsdp", 1, "adamw"), ("ddp", 2, "adamw"), ("fsdp", 2, "adamw"),
    ("ddp", 1, "muon"), ("fsdp", 1, "muon")])
def test_two_ranks_match_one_process(mode, accum, optimizer, reference, tmp_path):
    """The Trainer under torchrun (2 ranks, per-rank micro-batch halved) reproduces the one-process run;
    with Muon, FSDP gathers each sharded matrix for the orthogonalisation."""
    out = tmp_path / mode
    _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(WORKER), mode, str(out), str(accum), optimizer])
    ref = reference[accum, optimizer]
    curve, ref_curve = _curve(out), _curve(ref)
    assert len(curve) == len(ref_curve) == 6  # 5 steps + the final validation
    loss_diff = max(abs(a - b) for a, b in zip(curve, ref_curve))
    weight_diff = _max_diff(_weights(out / "final"), _weights(ref / "final"))
    print(f"{mode} accum={accum} {optimizer}: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert loss_diff < 1e-5
    assert weight_diff < 3e-5  # Adam turns ~1e-7 reduction-order noise into ~1e-5
    # the resume position is the one-process run's
    assert _loader_state(out / "final") == _loader_state(ref / "final")
    # resumed from step_3/ (a fresh Trainer: weights, sharded optimizer state, RNG, data position), the
    # run ends exactly where the uninterrupted one did
    final = _weights(out / "final")
    resumed = _weights(out / "resumed" / "final")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    # only rank 0 wrote: one record per step
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 5]
    # the gathered checkpoint loads in one process, tied head included
    model = MiniGPT.from_pretrained(out / "final")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    single = MiniGPT.from_pretrained(ref / "final")
    ids = torch.arange(1, 17).unsqueeze(0)
    torch.testing.assert_close(model(ids).logits, single(ids).logits, atol=1e-4, rtol=0)
    shutil.rmtree(out, ignore_errors=True)


class _Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i])}


def test_sharded_loader_partitions_the_global_batch():
    data = _Items(23)
    single = [b["input_ids"].flatten().tolist() for b in BatchLoader(data, 8, seed=3)]
    ranks = []
    for rank in range(2):
        loader = D.ShardedBatchLoader(BatchLoader(data, 8, seed=3), rank, 2)
        ranks.append([b["input_ids"].flatten().tolist() for b in loader])
        assert len(loader) == len(ranks[-1]) == 3
        assert loader.state_dict() == {"epoch": 1, "batch_index": 0, "seed": 3}
    for batch, a, b in zip(single, *ranks):
        assert sorted(a + b) == sorted(batch) and not set(a) & set(b)
    # resume mid-epoch: the same remaining batches
    loader = D.ShardedBatchLoader(BatchLoader(data, 8, seed=3), 1, 2)
    it = iter(loader)
    next(it)
    resumed = D.ShardedBatchLoader(BatchLoader(data, 8, seed=3), 1, 2)
    resumed.load_state_dict(loader.state_dict())
    assert [b["input_ids"].flatten().tolist() for b in resumed] == ranks[1][1:]


def test_a_batch_shorter_than_the_ranks_is_kept_with_a_padding_share():
    """A global batch with fewer items than ranks is kept (as one process keeps it): the rank without an
    item forwards a padding copy marked to carry no weight."""
    data = _Items(17)  # global batches of 8: 8, 8, 1
    shares = [list(D.ShardedBatchLoader(BatchLoader(data, 8, shuffle=False), r, 2)) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    scored = [int(i) for s in shares for b in s if not b.get(D.PADDING_KEY) for i in b["input_ids"].flatten()]
    assert sorted(scored) == list(range(17))
    assert [D.PADDING_KEY in b for b in shares[1]] == [False, False, True]


def test_single_process_is_a_no_op():
    ctx = D.init_distributed("none")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, "none", ctx) is model
    loader = BatchLoader(_Items(4), 2)
    assert D.shard_loader(loader, ctx) is loader
    assert D.loss_scale(model) == 1.0 and D.global_count(5) == 5 and D.is_main()
    with D.grad_sync(model, sync=False):
        pass
    with pytest.raises(ValueError, match="allowed"):
        D.init_distributed("zero3")
    D.barrier()
    D.cleanup()


def _cli(out: Path, nproc: int, *args: str) -> list[str]:
    launcher = ([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
                else [sys.executable])
    return [*launcher, "-m", "minillm", "train", *args, "--out-dir", str(out)]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_minillm_train_under_torchrun_matches_one_process(tmp_path):
    """`torchrun -m minillm train`: FSDP pretraining and DDP LoRA fine-tuning reproduce the one-process
    runs with the same global batch (per-process batch halved)."""
    pretrain = ["--preset", "tiny", "--data", "builtin", "--max-steps", "4", "--max-length", "32",
                "--precision", "fp32", "eval_every=0", "data.num_documents=300", "tokenizer.vocab_size=400",
                "training.log_every=1", "training.warmup_steps=0", "training.progress=false"]
    def same_run(name: str, args: list[str], mode: str, points: int) -> None:
        _run(_cli(tmp_path / f"{name}_single", 1, *args, "--batch-size", "8"))
        _run(_cli(tmp_path / f"{name}_{mode}", 2, *args, "--batch-size", "4", "--distributed", mode))
        curve, ref_curve = _curve(tmp_path / f"{name}_{mode}"), _curve(tmp_path / f"{name}_single")
        assert len(curve) == len(ref_curve) == points
        assert max(abs(a - b) for a, b in zip(curve, ref_curve)) < 1e-5
        merged = MiniGPT.from_pretrained(tmp_path / f"{name}_{mode}" / "final")  # loads in one process
        single = MiniGPT.from_pretrained(tmp_path / f"{name}_single" / "final")
        ids = torch.arange(1, 17).unsqueeze(0)
        torch.testing.assert_close(merged(ids).logits, single(ids).logits, atol=1e-4, rtol=0)

    same_run("pretrain", pretrain, "fsdp", 5)
    sft = ["stage=sft", f"init_from={tmp_path / 'pretrain_single' / 'final'}", "--max-steps", "3",
           "--max-length", "64", "--precision", "fp32", "eval_every=0", "data.num_documents=100", "lora.rank=4",
           "--lr", "1e-2", "training.log_every=1", "training.warmup_steps=0", "training.progress=false"]
    same_run("sft", sft, "ddp", 4)
