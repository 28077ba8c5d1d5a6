"""Muon and the warmup-stable-decay schedule: one step against an independent float64 reference, the
orthogonalisation, the parameter split, and training with them through the Trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minillm.model import MiniGPT, MiniGPTConfig
from minillm.model.lora import LoRAConfig, apply_lora
from minillm.training.memory import estimate_memory, hidden_matrix_parameters
from minillm.training.optim import Muon, build_optimizer, newton_schulz, parameter_groups
from minillm.training.schedule import wsd_multiplier
from minillm.training.trainer import PreTrainer, TrainingConfig


def _reference_ns(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Newton–Schulz in float64 numpy, written from the formula: X ← aX + (bA + cA²)X, A = XXᵀ."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _reference_step(params, grads, state, *, muon_lr, momentum, muon_wd, lr, betas, wd, eps, step):
    """One step of Muon (hidden matrices) + AdamW (the rest) in float64 numpy; `state` is updated."""
    out = {}
    for name, p in params.items():
        g = grads[name]
        if name.startswith("hidden"):
            buf = state.setdefault(name, np.zeros_like(p))
            buf[:] = momentum * buf + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * buf
            o = _reference_ns(u)
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            out[name] = p * (1 - muon_lr * muon_wd) - muon_lr * scale * o
        else:
            m, v = state.setdefault(name, (np.zeros_like(p), np.zeros_like(p)))
            m[:] = betas[0] * m + (1 - betas[0]) * g
            v[:] = betas[1] * v + (1 - betas[1]) * g * g
            m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
            decay = wd if name.startswith("decay") else 0.0
            out[name] = p * (1 - lr * decay) - lr * m_hat / (np.sqrt(v_hat) + eps)
    return out


def test_muon_steps_match_a_float64_reference():
    rng = np.random.default_rng(0)
    shapes = {"hidden_wide": (6, 10), "hidden_tall": (12, 5), "decay_head": (7, 4), "bias": (7,)}
    values = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in values.items()}
    settings = dict(muon_lr=0.03, momentum=0.9, muon_wd=0.1, lr=0.01, betas=(0.9, 0.95), wd=0.1, eps=1e-8)
    optimizer = Muon([
        {"params": [params["hidden_wide"], params["hidden_tall"]], "use_muon": True, "lr": 0.03,
         "momentum": 0.9, "weight_decay": 0.1},
        {"params": [params["decay_head"]], "lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1},
        {"params": [params["bias"]], "lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.0},
    ], ns_dtype=torch.float64)
    reference, state = dict(values), {}
    for step in range(1, 4):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        for k, p in params.items():
            p.grad = torch.tensor(grads[k], dtype=torch.float64)
        optimizer.step()
        reference = _reference_step(reference, grads, state, step=step, **settings)
        for k, p in params.items():
            np.testing.assert_allclose(p.detach().numpy(), reference[k], rtol=1e-10, atol=1e-12, err_msg=k)
    # the update is not a plain gradient step: the hidden matrices moved by an orthogonalised amount
    assert not np.allclose(reference["hidden_wide"], values["hidden_wide"] - 0.03 * grads["hidden_wide"])


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 16)]:
        g = torch.randn(shape, dtype=torch.float64) @ torch.diag(torch.logspace(-2, 0, shape[1], dtype=torch.float64))
        s = torch.linalg.svdvals(newton_schulz(g, dtype=torch.float64))
        assert s.min() > 0.5 and s.max() < 1.3, s  # the singular values spread from 0.01..1 to about 1
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        exact = u @ vh
        cosine = (newton_schulz(g, dtype=torch.float64) * exact).sum() / exact.norm() ** 2
        assert cosine > 0.85  # close to the exact polar factor UVᵀ


def test_muon_matches_pytorch_muon_in_bf16():
    """PyTorch's own torch.optim.Muon (Newton–Schulz in bf16) on one matrix, same settings: the same
    update up to bf16 rounding (the products are grouped differently)."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(16, 24))
    start = ours.detach().clone()
    theirs = torch.nn.Parameter(ours.detach().clone())
    mine = Muon([{"params": [ours], "use_muon": True, "lr": 0.02, "momentum": 0.95, "weight_decay": 0.01}],
                ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.01, nesterov=True)
    for _ in range(3):
        grad = torch.randn(16, 24)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    ours_update, their_update = (ours - start).detach(), (theirs - start).detach()
    cosine = (ours_update * their_update).sum() / (ours_update.norm() * their_update.norm())
    assert cosine > 0.999 and abs(ours_update.norm() / their_update.norm() - 1) < 0.01


def test_parameter_groups_split_hidden_matrices():
    model = MiniGPT(MiniGPTConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, num_hidden_layers=2, intermediate_size=64,
                                              tie_word_embeddings=False, qkv_bias=True))
    groups = dict(parameter_groups(model.named_parameters(), "muon"))
    muon = {n for n, _ in groups["muon"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() == 2}
    assert all(n.endswith("proj.weight") for n in muon)
    others = {n for n, _ in groups["decay"] + groups["no_decay"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= others
    assert any(n.endswith("q_proj.bias") for n in others)
    assert sum(p.numel() for _, p in groups["muon"]) == hidden_matrix_parameters(model.config)
    adamw = dict(parameter_groups(model.named_parameters(), "adamw"))
    assert "muon" not in adamw and len(adamw["decay"]) + len(adamw["no_decay"]) == len(list(model.parameters()))


def test_muon_with_lora_updates_only_the_adapters():
    model = MiniGPT(MiniGPTConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_attention_heads=4,
                                              num_hidden_layers=2, intermediate_size=64))
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    groups = dict(parameter_groups(model.named_parameters(), "muon"))
    assert groups["muon"] and all("lora_" in n for n, _ in groups["muon"])
    assert not groups["decay"] and not groups["no_decay"]


def test_memory_estimate_counts_one_state_for_muon_matrices():
    config = MiniGPTConfig.from_preset("tiny")
    adamw = estimate_memory(config, 4, 64, optimizer="adamw")
    muon = estimate_memory(config, 4, 64, optimizer="muon")
    assert adamw.optimizer - muon.optimizer == 4 * hidden_matrix_parameters(config)


def test_wsd_schedule_shape():
    values = [wsd_multiplier(s, warmup_steps=10, total_steps=100, min_lr_ratio=0.1, decay_fraction=0.2)
              for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[10:80])
    assert values[80] == pytest.approx(1.0) and values[90] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(values[80:100], values[81:100]))
    assert values[100:] == [0.1] * 10


def _batches(vocab: int, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    pattern = torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(0))  # one text to learn
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        offsets = torch.randint(0, 8, (8, 1), generator=g)
        ids = pattern[(offsets + torch.arange(32)) % 8]
        out.append({"input_ids": ids, "labels": ids})
    return out


def _small_model(seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_attention_heads=4,
                                             num_hidden_layers=2, intermediate_size=64))


def test_muon_training_lowers_the_loss(tmp_path):
    model = _small_model()
    trainer = PreTrainer(model, config=TrainingConfig(optimizer="muon", lr_schedule="wsd", max_steps=30, lr=3e-3,
                                                      warmup_steps=3, progress=False, precision="fp32",
                                                      log_every=5, out_dir=str(tmp_path)),
                         train_data=_batches(64, 30), device="cpu")
    assert isinstance(trainer.optimizer, type(None))
    first = trainer.evaluate(_batches(64, 2, seed=1))["val_loss"]
    trainer.train()
    assert isinstance(trainer.optimizer, Muon)
    assert trainer.evaluate(_batches(64, 2, seed=1))["val_loss"] < 0.5 * first
    # both rates are logged under their own names, on the one schedule
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [(r["lr"], r["muon_lr"]) for r in records if "muon_lr" in r]
    assert len(rates) == 6 and all(muon / adamw == pytest.approx(0.02 / 3e-3) for adamw, muon in rates)


def test_muon_gradient_accumulation_equals_one_large_batch():
    batches = _batches(64, 2)
    big = [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}]
    results = []
    for data, accum in ((batches, 2), (big, 1)):
        model = _small_model()
        trainer = PreTrainer(model, config=TrainingConfig(optimizer="muon", max_steps=1, grad_accum_steps=accum,
                                                          progress=False, precision="fp32", warmup_steps=0),
                             train_data=data, device="cpu")
        trainer.train()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-5)


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer='sgd' is not supported"):
        build_optimizer([], "sgd", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        TrainingConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="muon_momentum"):
        TrainingConfig(muon_momentum=1.0)
