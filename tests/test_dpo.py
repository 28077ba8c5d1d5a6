"""DPO: the loss and metrics against the formulas, log 2 at initialisation, and training on the built-in pairs."""

import math

import pytest
import torch

from minillm.data.builtin import builtin_preference_pairs
from minillm.data.preference import DPODataLoader, PreferenceDataset
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.training.objectives import DPOObjective, dpo_loss, sequence_logps
from minillm.training.stages import DPOTrainer


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize(("loss_type", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                                      ("hinge", 0.0)])
def test_dpo_loss_equals_the_formula_on_random_log_probs(loss_type, smoothing):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(64, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    beta = 0.3
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
    for i in range(64):
        h = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
        if loss_type == "sigmoid":
            expected = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
        elif loss_type == "ipo":
            expected = (h - 1 / (2 * beta)) ** 2
        else:
            expected = max(0.0, 1 - beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


def test_sequence_logps_sum_the_labelled_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    logp = torch.log_softmax(logits, -1)
    expected = [logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5], logp[1, 0, 7] + logp[1, 1, 8]]
    torch.testing.assert_close(sequence_logps(logits, labels), torch.stack(expected))
    torch.testing.assert_close(sequence_logps(logits, labels, average=True),
                               torch.stack([expected[0] / 3, expected[1] / 2]))


@pytest.fixture(scope="module")
def pairs():
    return builtin_preference_pairs(96, seed=5)


def small_model(tokenizer) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, max_position_embeddings=256))


def test_at_initialisation_the_loss_is_log_2_and_the_rewards_zero(tokenizer, pairs):
    model = small_model(tokenizer)
    batch = next(iter(DPODataLoader(pairs, tokenizer, batch_size=8, max_length=128)))
    out = DPOObjective(reference=small_model(tokenizer))(model, batch)
    assert out.loss_sum.item() / 8 == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/margins"].abs().item() < 1e-5
    # the label-smoothed (cDPO) loss is log 2 there as well
    smoothed = DPOObjective(reference=small_model(tokenizer), label_smoothing=0.1)(model, batch)
    assert smoothed.loss_sum.item() / 8 == pytest.approx(math.log(2), abs=1e-6)


def test_rpo_adds_the_chosen_replies_mean_token_nll(tokenizer, pairs):
    model = small_model(tokenizer).eval()
    batch = next(iter(DPODataLoader(pairs, tokenizer, batch_size=4, max_length=128)))
    out = DPOObjective(reference=small_model(tokenizer), rpo_alpha=0.5)(model, batch)
    logits = model(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    labels = batch["chosen_labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                            reduction="none").sum(1) / (labels != -100).sum(1)
    assert out.loss_sum.item() == pytest.approx(4 * math.log(2) + 0.5 * nll.sum().item(), rel=1e-5)
    assert out.metrics["nll_loss"].item() == pytest.approx(nll.sum().item(), rel=1e-5)


def test_one_forward_over_both_halves_equals_separate_forwards(tokenizer, pairs):
    model = small_model(tokenizer).eval()
    batch = next(iter(DPODataLoader(pairs, tokenizer, batch_size=4, max_length=128)))
    chosen, rejected = DPOObjective().logps(model, batch)
    for side, together in (("chosen", chosen), ("rejected", rejected)):
        alone = sequence_logps(model(batch[f"{side}_input_ids"],
                                     attention_mask=batch[f"{side}_attention_mask"]).logits, batch[f"{side}_labels"])
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_training_raises_reward_accuracy_and_margin(tokenizer, pairs, precompute, tmp_path):
    train = PreferenceDataset(pairs[16:], tokenizer, max_length=128)
    val = PreferenceDataset(pairs[:16], tokenizer, max_length=128)
    trainer = DPOTrainer(small_model(tokenizer), tokenizer, train_data=train, eval_data=val, max_steps=25,
                         batch_size=8, lr=3e-3, warmup_steps=2, beta=0.5, precompute_ref_logps=precompute,
                         precision="fp32", progress=False, log_every=1, eval_batches=0, out_dir=str(tmp_path))
    before = trainer.evaluate()["val_loss"]
    trainer.train()
    records = [eval(line.replace("null", "None")) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rewards/accuracies" in r]
    first, last = steps[0], steps[-5:]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at step 1
    assert sum(r["rewards/accuracies"] for r in last) / 5 > 0.8
    assert sum(r["rewards/margins"] for r in last) / 5 > 0.5
    assert trainer.evaluate()["val_loss"] < before - 0.2  # held-out pairs too
    if precompute:
        assert trainer.objective.reference is None and "ref_chosen_logps" in train[0]


def test_bad_dpo_options_are_refused():
    with pytest.raises(ValueError, match="loss_type='kto'"):
        DPOObjective(loss_type="kto")
    with pytest.raises(ValueError, match="beta must be positive"):
        DPOObjective(beta=0)
    with pytest.raises(ValueError, match="rpo_alpha must be >= 0"):
        DPOObjective(rpo_alpha=-1)


@pytest.mark.parametrize("precompute", ["false", "true"])
def test_stage_dpo_runs_from_a_checkpoint_and_resumes_exactly(tokenizer, tmp_path, precompute):
    from safetensors.torch import load_file

    from minillm.cli import main

    start = tmp_path / "sft"
    small_model(tokenizer).save_pretrained(start)
    tokenizer.save_pretrained(start)
    args = ["train", "--config", "dpo_tiny", f"init_from={start}", "--max-steps", "6", "save_every=3",
            "eval_every=0", "data.num_documents=120", "--batch-size", "4", "--precision", "fp32",
            "training.progress=false", "training.log_every=1", "objective.rpo_alpha=0",
            f"objective.precompute_ref_logps={precompute}"]
    assert main([*args, "--out-dir", str(tmp_path / "run")]) == 0
    records = [eval(x.replace("null", "None")) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and "rewards/margins" in records[0]
    assert "val_ppl" not in records[-1]  # a perplexity of DPO losses would mean nothing
    assert main([*args, "--out-dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "run" / "step_3")]) == 0
    resumed_steps = [eval(x.replace("null", "None")).get("step")
                     for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert resumed_steps[0] == 4  # it did continue from step 3
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("run", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_dpo_needs_a_starting_checkpoint(capsys):
    from minillm.cli import main

    assert main(["train", "--config", "dpo_tiny", "init_from=null", "--dry-run"]) == 2
    assert "stage dpo needs init_from" in capsys.readouterr().err
