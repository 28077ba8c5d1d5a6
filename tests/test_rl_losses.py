"""RL math against independent computations: GAE, the clipped policy and value losses, the KL estimators,
whitening, GRPO's group advantages, PPO's per-token rewards, the PPO and GRPO objectives on a tiny model,
and the value head's zero start and separate checkpoint file."""

import math
import statistics

import pytest
import torch
from safetensors import safe_open

from minillm.model import MiniGPT, MiniGPTConfig
from minillm.model.heads import VALUE_HEAD_FILE, MiniGPTWithValueHead
from minillm.rl.grpo import group_advantages
from minillm.rl.ppo import token_rewards
from minillm.training.objectives import (
    GRPOObjective,
    PPOObjective,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_estimate,
    masked_whiten,
    token_logps,
)

F64 = torch.float64


# ---------------------------------------------------------------------------------------- GAE
def test_gae_equals_a_hand_computation_and_ignores_masked_positions():
    """A and R = A + V match a reversed Python loop; prompt and padding positions are 0 and their values
    and rewards do not leak into the reply (V after the reply's last token counts as 0)."""
    gamma, lam = 0.9, 0.8
    r0, v0 = [0.1, -0.2, 0.0, 1.0], [0.5, 0.3, -0.1, 0.4]  # row 0: a 4-token reply, then 2 padding positions
    r1, v1 = [0.3, -0.5], [0.2, -0.6]  # row 1: 2 prompt positions, a 2-token reply, 2 padding positions
    junk = 7.0  # on masked positions: must not matter
    rewards = torch.tensor([r0 + [junk, -junk], [junk, -junk] + r1 + [junk, junk]], dtype=F64)
    values = torch.tensor([v0 + [junk, junk], [-junk, junk] + v1 + [junk, -junk]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)

    def hand(r, v):
        advantages, last = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            next_value = v[t + 1] if t + 1 < len(r) else 0.0
            delta = r[t] + gamma * next_value - v[t]
            last = delta + gamma * lam * last
            advantages[t] = last
        return advantages

    a0, a1 = hand(r0, v0), hand(r1, v1)
    # the last two steps of row 0 worked out: δ_3 = 1.0 − 0.4 = 0.6 = A_3; δ_2 = 0.9·0.4 + 0.1 = 0.46,
    # A_2 = 0.46 + 0.72·0.6 = 0.892; row 1: A_1 = −0.5 + 0.6 = 0.1, A_0 = 0.3 − 0.54 − 0.2 + 0.072 = −0.368
    assert a0[3] == pytest.approx(0.6) and a0[2] == pytest.approx(0.892)
    assert a1 == pytest.approx([-0.368, 0.1])
    expected_a = torch.tensor([a0 + [0.0, 0.0], [0.0, 0.0] + a1 + [0.0, 0.0]], dtype=F64)
    expected_r = torch.tensor([[a + v for a, v in zip(a0, v0)] + [0.0, 0.0],
                               [0.0, 0.0] + [a + v for a, v in zip(a1, v1)] + [0.0, 0.0]], dtype=F64)

    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, expected_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_r, rtol=1e-12, atol=1e-12)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


# ---------------------------------------------------------------------------------------- clipped losses
@pytest.mark.parametrize(("ratio", "adv", "clip_low", "clip_high", "loss", "flag"), [
    (1.1, 1.0, 0.2, None, -1.1, False),  # inside the range: both terms equal
    (1.5, 1.0, 0.2, None, -1.2, True),  # A > 0, ratio above 1 + ε: the clipped term is larger
    (0.5, 1.0, 0.2, None, -0.5, False),  # A > 0, ratio below 1 − ε: the unclipped term is larger
    (0.5, -2.0, 0.2, None, 1.6, True),  # A < 0, ratio below 1 − ε: clipped, 2·0.8
    (1.5, -2.0, 0.2, None, 3.0, False),  # A < 0, ratio above 1 + ε: the unclipped term is larger
    (0.9, -2.0, 0.2, None, 1.8, False),  # A < 0, inside
    (3.0, 0.0, 0.2, None, 0.0, False),  # no advantage, no loss, no flag
    (1.25, 1.0, 0.2, 0.28, -1.25, False),  # clip-higher: 1.25 is inside [0.8, 1.28]
    (1.25, 1.0, 0.2, None, -1.2, True),  # ... but clipped with the symmetric 0.2
    (1.4, 1.0, 0.2, 0.28, -1.28, True),  # clipped at 1 + ε_high
    (0.7, -1.0, 0.2, 0.28, 0.8, True),  # the low side still clips at 1 − ε_low
])
def test_clipped_policy_loss_equals_hand_numbers(ratio, adv, clip_low, clip_high, loss, flag):
    """max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) with hand-worked values, flagged where the clipped
    term wins."""
    logps = torch.tensor([math.log(ratio) - 2.0], dtype=F64)
    old = torch.tensor([-2.0], dtype=F64)
    out, clipped = clipped_policy_loss(logps, old, torch.tensor([adv], dtype=F64), clip_low, clip_high)
    assert out.item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert bool(clipped.item()) is flag


@pytest.mark.parametrize(("v", "old", "ret", "loss", "flag"), [
    (1.0, 0.5, 0.0, 0.5, False),  # V_clip = 0.7 is closer to R: the unclipped ½·1² wins
    (1.0, 0.5, 2.0, 0.845, True),  # V_clip = 0.7: ½·1.3² = 0.845 > ½·1² — clipping makes it larger
    (-1.0, 0.0, -0.5, 0.125, False),  # V_clip = −0.2: ½·0.25 vs ½·0.09
    (0.0, 1.0, -1.0, 1.62, True),  # V_clip = 0.8: ½·1.8² = 1.62 > ½·1²
    (0.625, 0.5, 2.0, 0.9453125, False),  # inside the range (exact in binary): both terms are ½·1.375²
])
def test_clipped_value_loss_equals_hand_numbers(v, old, ret, loss, flag):
    """½·max((V − R)², (V_old + clamp(V − V_old, ±ε) − R)²) with hand-worked values and the clipped flag."""
    out, clipped = clipped_value_loss(*(torch.tensor([x], dtype=F64) for x in (v, old, ret)), clip=0.2)
    assert out.item() == pytest.approx(loss, rel=1e-12)
    assert bool(clipped.item()) is flag


# ---------------------------------------------------------------------------------------- KL estimators
def test_kl_estimators_equal_their_formulas_and_k3_is_never_negative():
    """With d = log π_ref − log π: k1 = −d, k2 = ½d², k3 = e^d − 1 − d ≥ 0; an unknown kind is refused."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(200, generator=g, dtype=F64) * 6
    ref = -torch.rand(200, generator=g, dtype=F64) * 6
    k1, k2, k3 = (kl_estimate(logps, ref, kind) for kind in ("k1", "k2", "k3"))
    for i in range(200):
        lp, rp = logps[i].item(), ref[i].item()
        assert k1[i].item() == pytest.approx(lp - rp, rel=1e-12, abs=1e-12)
        assert k2[i].item() == pytest.approx(0.5 * (rp - lp) ** 2, rel=1e-12, abs=1e-12)
        assert k3[i].item() == pytest.approx(math.exp(rp - lp) - 1 - (rp - lp), rel=1e-9, abs=1e-12)
    assert (k1 < 0).any()  # k1 is unbiased but not a distance per sample
    assert (k3 >= 0).all()
    assert (kl_estimate(logps.float(), ref.float(), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logps, ref, "k4")


def test_k1_and_k3_estimate_the_exact_kl_from_samples():
    """Over many samples of a small categorical π, the means of k1 and k3 approach KL(π ‖ π_ref)."""
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(6, generator=g, dtype=F64).log_softmax(-1)
    ref = (logp + 0.6 * torch.randn(6, generator=g, dtype=F64)).log_softmax(-1)
    exact = sum(math.exp(logp[i].item()) * (logp[i].item() - ref[i].item()) for i in range(6))
    assert exact > 0.05  # the two distributions differ noticeably
    n = 200_000
    samples = torch.multinomial(logp.exp(), n, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = kl_estimate(logp[samples], ref[samples], kind)
        tolerance = 5 * est.std().item() / math.sqrt(n)
        assert abs(est.mean().item() - exact) < tolerance, kind
    # k2 is biased: its mean is not the KL here (it is only close for nearby distributions)
    k2 = kl_estimate(logp[samples], ref[samples], "k2")
    assert abs(k2.mean().item() - exact) > 5 * k2.std().item() / math.sqrt(n)


# ---------------------------------------------------------------------------------------- whitening
def test_masked_whiten_gives_zero_mean_unit_std_on_the_mask_only():
    """Masked entries get mean 0 and unbiased std 1 (or keep their mean with shift_mean=False); the rest
    are 0."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, generator=g, dtype=F64) * 3 + 5
    mask = torch.rand(4, 9, generator=g) < 0.6
    x[~mask] = 1000.0  # must not move the statistics
    picked = x[mask].tolist()
    mean, std = statistics.fmean(picked), statistics.stdev(picked)

    out = masked_whiten(x, mask)
    assert (out[~mask] == 0).all()
    assert statistics.fmean(out[mask].tolist()) == pytest.approx(0.0, abs=1e-9)
    assert statistics.stdev(out[mask].tolist()) == pytest.approx(1.0, abs=1e-6)
    for (i, j) in mask.nonzero().tolist():
        expected = (x[i, j].item() - mean) / math.sqrt(std ** 2 + 1e-8)
        assert out[i, j].item() == pytest.approx(expected, rel=1e-9)

    kept = masked_whiten(x, mask, shift_mean=False)
    assert (kept[~mask] == 0).all()
    assert statistics.fmean(kept[mask].tolist()) == pytest.approx(mean, rel=1e-9)
    assert statistics.stdev(kept[mask].tolist()) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------- GRPO / PPO helpers
def test_group_advantages_normalise_within_each_group():
    """(r − group mean) / (unbiased group std + 1e-4); r − mean without scaling; a group with one reward
    gives 0."""
    groups = [[1.0, 0.0, 0.0, 1.0], [0.5, 2.0, 3.0, -1.0]]
    rewards = torch.tensor(groups[0] + groups[1], dtype=F64)
    expected, centred = [], []
    for group in groups:
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        expected += [(r - mean) / (std + 1e-4) for r in group]
        centred += [r - mean for r in group]
    # group 0 by hand: mean 0.5, std √(1/3)
    assert expected[0] == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4))
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-12)
    assert group_advantages(rewards, 4, scale_rewards=False).tolist() == pytest.approx(centred, rel=1e-12)
    flat = group_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 1.0]), 4)
    assert flat[:4].tolist() == [0.0] * 4 and (flat[4:] != 0).all()


def test_token_rewards_pay_the_kl_on_reply_tokens_and_the_score_on_the_last():
    """−kl_coef·KL on each reply token, plus the score on the row's last reply token only."""
    g = torch.Generator().manual_seed(3)
    kl = torch.randn(3, 6, generator=g, dtype=F64)  # nonzero everywhere, masked positions included
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.5, 0.25], dtype=F64)
    out = token_rewards(scores, kl, mask, kl_coef=0.1)
    last = [3, 3, 5]
    for i in range(3):
        for t in range(6):
            expected = -0.1 * kl[i, t].item() if mask[i, t] else 0.0
            if t == last[i]:
                expected += scores[i].item()
            assert out[i, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15), (i, t)


# ------------------------------------------------------------------------------------ objectives on a model
def tiny_model() -> MiniGPTWithValueHead:
    torch.manual_seed(0)
    return MiniGPTWithValueHead(MiniGPTConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=64))


PROMPT_REPLY = [(3, 5), (4, 6), (2, 3)]  # per row: prompt tokens, reply tokens; right-padded to T = 10


def rl_batch(seed: int) -> dict[str, torch.Tensor]:
    """Three right-padded rows (labels −100 on prompt and padding) and random per-token RL tensors on the
    (B, T − 1) grid, zero off the reply."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(PROMPT_REPLY), 10
    ids = torch.randint(1, 50, (b, t), generator=g)
    attention = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100)
    for i, (p, r) in enumerate(PROMPT_REPLY):
        attention[i, :p + r] = 1
        labels[i, p:p + r] = ids[i, p:p + r]
        ids[i, p + r:] = 0
    mask = (labels[:, 1:] != -100).to(F64)

    def rand(scale: float, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(b, t - 1, generator=g, dtype=F64) * scale + shift) * mask

    # an untrained model gives log-probabilities near −log 50: ratios land inside and outside [0.8, 1.2]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "old_logps": rand(0.3, -math.log(50)), "ref_logps": rand(0.3, -math.log(50)),
            "advantages": rand(1.0), "returns": rand(1.0), "old_values": rand(1.0)}


def reply_positions(batch):
    """(row, t, token) for each reply token on the (B, T − 1) grid: position t scores token t + 1."""
    labels = batch["labels"]
    return [(i, t, int(labels[i, t + 1])) for i in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
            if labels[i, t + 1] != -100]


def reference_terms(model, batch, clip_low, clip_high, clip_value, temperature=1.0):
    """Per reply token, in float64 Python arithmetic: (logp, policy term, clipped flag, value term, value
    flag)."""
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        values = model.v_head(out.hidden_states)[..., 0]
    terms = []
    for i, t, token in reply_positions(batch):
        logp = (out.logits[i, t].double() / temperature).log_softmax(-1)[token].item()
        old, adv = batch["old_logps"][i, t].item(), batch["advantages"][i, t].item()
        ratio = math.exp(logp - old)
        unclipped, clipped = -adv * ratio, -adv * min(max(ratio, 1 - clip_low), 1 + clip_high)
        v, v_old, ret = values[i, t].item(), batch["old_values"][i, t].item(), batch["returns"][i, t].item()
        v_clip = v_old + min(max(v - v_old, -clip_value), clip_value)
        vf_un, vf_cl = (v - ret) ** 2, (v_clip - ret) ** 2
        terms.append((logp, max(unclipped, clipped), clipped > unclipped,
                      0.5 * max(vf_un, vf_cl), vf_cl > vf_un))
    return terms


# Tolerance of the objective checks: the model and the reference computation are both float64.
TOL = {"rel": 1e-9, "abs": 1e-9}


def test_ppo_objective_equals_an_independent_computation():
    """loss_sum = Σ over reply tokens of clipped surrogate + vf_coef · clipped value loss; count, clipfrac,
    value_clipfrac and approx_kl match a per-token Python loop."""
    model = tiny_model().double()
    with torch.no_grad():  # a nonzero head, so that values and their clipping matter
        model.v_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(4))
        model.v_head.bias.fill_(0.1)
    batch = rl_batch(5)
    clip, clip_value, vf_coef = 0.2, 0.3, 0.7
    terms = reference_terms(model, batch, clip, clip, clip_value)
    objective = PPOObjective(clip_range=clip, clip_range_value=clip_value, vf_coef=vf_coef)
    out = objective(model, batch)

    assert objective.count(batch) == len(terms) == 14  # 5 + 6 + 3 reply tokens
    clipfrac = sum(c for _, _, c, _, _ in terms)
    value_clipfrac = sum(c for _, _, _, _, c in terms)
    assert 0 < clipfrac < len(terms) and 0 < value_clipfrac < len(terms)  # both branches are exercised
    expected = sum(pg + vf_coef * vf for _, pg, _, vf, _ in terms)
    assert out.loss_sum.item() == pytest.approx(expected, **TOL)
    assert out.metrics["policy_loss"].item() == pytest.approx(sum(pg for _, pg, _, _, _ in terms), **TOL)
    assert out.metrics["value_loss"].item() == pytest.approx(sum(vf for _, _, _, vf, _ in terms), **TOL)
    assert out.metrics["clipfrac"].item() == clipfrac
    assert out.metrics["value_clipfrac"].item() == value_clipfrac
    approx_kl = sum(0.5 * (logp - batch["old_logps"][i, t].item()) ** 2
                    for (logp, *_), (i, t, _) in zip(terms, reply_positions(batch)))
    assert out.metrics["approx_kl"].item() == pytest.approx(approx_kl, **TOL)
    assert out.loss_sum.requires_grad


@pytest.mark.parametrize(("beta", "clip_low", "clip_high"),
                         [(0.1, 0.2, None), (0.0, 0.2, None), (0.05, 0.2, 0.28)])
def test_grpo_objective_equals_an_independent_computation(beta, clip_low, clip_high):
    """loss_sum = Σ over reply tokens of clipped surrogate (clip-higher when given) + β·k3; no KL term,
    metric or reference needed when β = 0."""
    model = tiny_model().double()
    batch = rl_batch(6)
    if beta == 0:
        del batch["ref_logps"]
    high = clip_low if clip_high is None else clip_high
    terms = reference_terms(model, batch, clip_low, high, clip_value=1.0)
    objective = GRPOObjective(beta=beta, clip_low=clip_low, clip_high=clip_high)
    out = objective(model, batch)

    positions = reply_positions(batch)
    assert objective.count(batch) == len(terms) == 14
    kl = [math.exp(batch["ref_logps"][i, t].item() - logp) - 1 - (batch["ref_logps"][i, t].item() - logp)
          for (logp, *_), (i, t, _) in zip(terms, positions)] if beta > 0 else [0.0] * len(terms)
    expected = sum(pg + beta * k for (_, pg, _, _, _), k in zip(terms, kl))
    assert out.loss_sum.item() == pytest.approx(expected, **TOL)
    clipfrac = sum(c for _, _, c, _, _ in terms)
    assert 0 < clipfrac < len(terms)
    assert out.metrics["clipfrac"].item() == clipfrac
    assert out.metrics["policy_loss"].item() == pytest.approx(sum(pg for _, pg, _, _, _ in terms), **TOL)
    ratio = sum(math.exp(logp - batch["old_logps"][i, t].item())
                for (logp, *_), (i, t, _) in zip(terms, positions))
    assert out.metrics["ratio"].item() == pytest.approx(ratio, **TOL)
    if beta > 0:
        assert out.metrics["kl"].item() == pytest.approx(sum(kl), **TOL)
    else:
        assert "kl" not in out.metrics


def test_rl_log_probabilities_are_those_of_the_sampling_temperature():
    """Replies sampled at temperature T come from softmax(logits / T): the objectives score them there."""
    model = tiny_model().double()
    batch = rl_batch(6)
    del batch["ref_logps"]
    terms = reference_terms(model, batch, 0.2, 0.2, clip_value=1.0, temperature=0.7)
    objective = GRPOObjective(beta=0.0)
    objective.temperature = 0.7
    assert objective(model, batch).loss_sum.item() == pytest.approx(sum(pg for _, pg, _, _, _ in terms), **TOL)
    objective.temperature = 1.0
    assert objective(model, batch).loss_sum.item() != pytest.approx(sum(pg for _, pg, _, _, _ in terms), **TOL)


def test_clip_higher_changes_the_grpo_loss():
    """With ratios above 1.2 and positive advantages, clip_high = 0.28 lets more of the ratio through."""
    model = tiny_model().double()
    batch = rl_batch(6)
    symmetric = GRPOObjective(beta=0.0, clip_low=0.2)(model, batch)
    higher = GRPOObjective(beta=0.0, clip_low=0.2, clip_high=0.28)(model, batch)
    terms_sym = reference_terms(model, batch, 0.2, 0.2, 1.0)
    terms_high = reference_terms(model, batch, 0.2, 0.28, 1.0)
    assert sum(pg for _, pg, *_ in terms_sym) != pytest.approx(sum(pg for _, pg, *_ in terms_high))
    assert higher.loss_sum.item() == pytest.approx(sum(pg for _, pg, *_ in terms_high), **TOL)
    assert symmetric.loss_sum.item() == pytest.approx(sum(pg for _, pg, *_ in terms_sym), **TOL)


def test_on_policy_grpo_loss_is_minus_the_advantages_and_its_gradient_raises_good_replies():
    """With old_logps = the model's own, ρ = 1 and loss_sum = −Σ A over reply tokens; the gradient on the
    logits is −A·(onehot − softmax), and one SGD step raises the positive-advantage row's log-probability
    and lowers the negative one's."""
    model = tiny_model().double()
    batch = rl_batch(7)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch["old_logps"] = token_logps(logits, batch["labels"])[0].to(F64)
    mask = (batch["labels"][:, 1:] != -100).to(F64)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.0], dtype=F64)[:, None] * mask

    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep)
    out = GRPOObjective(beta=0.0)(model, batch)
    handle.remove()
    assert out.loss_sum.item() == pytest.approx(-(batch["advantages"] * mask).sum().item(), rel=1e-12)
    assert out.metrics["clipfrac"].item() == 0
    model.zero_grad()
    out.loss_sum.backward()

    grad = captured["logits"].grad
    probs = captured["logits"].detach().softmax(-1)
    for i, t, token in reply_positions(batch):
        expected = probs[i, t].clone()
        expected[token] -= 1.0
        expected *= batch["advantages"][i, t].item()  # −A·(onehot − p)
        torch.testing.assert_close(grad[i, t], expected, rtol=1e-5, atol=1e-7)
    sampled = [grad[i, t, token].item() for i, t, token in reply_positions(batch) if i == 0]
    assert sampled and all(g < 0 for g in sampled)  # A = +1: a descent step raises the sampled tokens' logits

    def row_logps() -> list[float]:
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return token_logps(logits, batch["labels"])[0].sum(-1).tolist()

    before = row_logps()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = row_logps()
    assert after[0] > before[0]  # advantage +1: more likely
    assert after[1] < before[1]  # advantage −1: less likely


# ---------------------------------------------------------------------------------------- value head
def test_value_head_starts_at_zero_and_is_saved_apart(tmp_path):
    """The head starts at zero; save_pretrained keeps it out of model.safetensors (a plain MiniGPT checkpoint
    with the same logits) and in value_head.safetensors, which from_policy restores; a plain checkpoint
    gives a zero head."""
    model = tiny_model().eval()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(8))
    out = model(ids)
    values = model.value(out.hidden_states)
    assert values.shape == (2, 7) and (values == 0).all()

    with torch.no_grad():
        model.v_head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(9))
        model.v_head.bias.fill_(0.25)
    values = model.value(model(ids).hidden_states)
    assert (values != 0).all()
    model.save_pretrained(tmp_path / "ppo")

    with safe_open(str(tmp_path / "ppo" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith("v_head") for k in keys)
    with safe_open(str(tmp_path / "ppo" / VALUE_HEAD_FILE), "pt") as f:
        head = {k: f.get_tensor(k) for k in f.keys()}
    torch.testing.assert_close(head["weight"], model.v_head.weight.detach())
    torch.testing.assert_close(head["bias"], model.v_head.bias.detach())

    policy = MiniGPT.from_pretrained(tmp_path / "ppo").eval()
    assert type(policy) is MiniGPT
    torch.testing.assert_close(policy(ids).logits, out.logits, rtol=0, atol=0)

    again = MiniGPTWithValueHead.from_policy(tmp_path / "ppo").eval()
    again_out = again(ids)
    torch.testing.assert_close(again_out.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(again.value(again_out.hidden_states), values, rtol=0, atol=0)

    policy.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / VALUE_HEAD_FILE).exists()
    fresh = MiniGPTWithValueHead.from_policy(tmp_path / "plain").eval()
    fresh_out = fresh(ids)
    torch.testing.assert_close(fresh_out.logits, out.logits, rtol=0, atol=0)
    assert (fresh.value(fresh_out.hidden_states) == 0).all()
