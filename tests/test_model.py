"""Behaviour of MiniGPT: causality, KV cache, GQA/MoE equivalences, presets, sizes, config errors."""

import math

import pytest
import torch

from minillm.model import PRESETS, ConfigError, KVCache, MiniGPT, MiniGPTConfig, get_tiny_config
from minillm.model.layers import MoE
from minillm.model.transformer import causal_lm_loss

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96, max_position_embeddings=64)

VARIANTS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "moe": dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32),
    "learned": dict(position_embedding="learned", norm_type="layernorm", mlp_type="gelu",
                    qkv_bias=True, out_bias=True, mlp_bias=True),
    "qknorm_bias_untied": dict(qk_norm=True, qkv_bias=True, tie_word_embeddings=False, num_key_value_heads=2),
}


def build(seed: int = 0, **overrides) -> MiniGPT:
    torch.manual_seed(seed)
    model = MiniGPT(MiniGPTConfig(**{**SMALL, **overrides}))
    # Non-trivial norm weights and biases so that equivalence tests cannot pass by accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_token_never_changes_earlier_logits(variant):
    model = build(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 20))
    base = model(ids).logits
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed).logits
        assert torch.equal(out[:, :t], base[:, :t]) or torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-4)


@pytest.mark.parametrize("preallocated", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(variant, preallocated):
    model = build(**VARIANTS[variant])
    ids = torch.randint(0, 97, (3, 24))
    full = model(ids).logits
    cache = KVCache(model.config.num_hidden_layers, max_length=24 if preallocated else None)
    # Prefill 10 tokens, then a chunk of 4 (needs an explicit causal mask), then one token at a time.
    pieces = [model(ids[:, :10], past_key_values=cache, use_cache=True).logits,
              model(ids[:, 10:14], past_key_values=cache, use_cache=True).logits]
    for t in range(14, 24):
        pieces.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert cache.seq_len == 24


def test_left_padding_gives_the_same_logits_as_the_unpadded_sequence():
    model = build(num_key_value_heads=2)
    ids = torch.randint(1, 97, (1, 12))
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    out = model(padded, attention_mask=mask).logits
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out[:, 5:], alone, atol=1e-5, rtol=0)


def test_gqa_equals_mha_with_repeated_key_value_heads():
    gqa = build(num_key_value_heads=2)
    mha = MiniGPT(MiniGPTConfig(**SMALL)).eval()
    state = gqa.state_dict()
    head_dim, groups = SMALL["hidden_size"] // SMALL["num_attention_heads"], 2
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # Query head h reads key/value head h // groups: repeat each kv head's rows `groups` times.
            heads = value.view(-1, head_dim, value.shape[-1])
            state[name] = heads.repeat_interleave(groups, dim=0).reshape(-1, value.shape[-1])
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(mha(ids).logits, gqa(ids).logits, atol=1e-5, rtol=0)


def test_gqa_with_as_many_kv_heads_as_heads_is_mha():
    a, b = build(seed=3), build(seed=3, num_key_value_heads=4)
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)


def test_moe_with_one_expert_top1_equals_the_dense_mlp():
    dense = build(seed=1)
    moe = MiniGPT(MiniGPTConfig(**SMALL, num_experts=1, num_experts_per_tok=1)).eval()
    state = {}
    for name, value in dense.state_dict().items():
        state[name.replace(".mlp.", ".mlp.experts.0.")] = value
    for i in range(SMALL["num_hidden_layers"]):
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(1, SMALL["hidden_size"])
    moe.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 16))
    out = moe(ids)
    torch.testing.assert_close(out.logits, dense(ids).logits, atol=1e-5, rtol=0)
    # One expert takes every token: the balancing loss is exactly its minimum, 1.
    assert out.aux_loss.item() == pytest.approx(1.0)


def test_moe_aux_loss_rewards_balance():
    moe = MoE(MiniGPTConfig(**SMALL, num_experts=4, num_experts_per_tok=1))
    x = torch.rand(4, 32, SMALL["hidden_size"])  # positive inputs
    with torch.no_grad():
        moe.gate.weight.zero_()  # uniform router: P_e = 1/4, ties routed to one expert
        uniform = moe(x)[1].item()
        moe.gate.weight.normal_()
        random_router = moe(x)[1].item()
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 10.0  # every token to expert 0 with probability ≈ 1
        collapsed = moe(x)[1].item()
    assert uniform == pytest.approx(1.0)  # E · Σ f_e · 1/E = 1 whatever f is
    assert collapsed == pytest.approx(4.0, rel=1e-3)  # E · f_0 · P_0 with f_0 = P_0 = 1
    assert 1.0 <= random_router < collapsed


def expected_parameter_count(c: MiniGPTConfig) -> int:
    """Count from the architecture description alone, independent of the module code."""
    h, hd = c.hidden_size, c.attention_head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    norm = 2 * h if c.norm_type == "layernorm" else h
    attention = h * q + 2 * h * kv + q * h
    attention += (q + 2 * kv) * c.qkv_bias + h * c.out_bias + (2 * hd if c.qk_norm else 0)

    def mlp(inter: int) -> int:
        matrices = 3 if c.mlp_type == "swiglu" else 2
        biases = (2 * inter if c.mlp_type == "swiglu" else inter) + h
        return matrices * h * inter + biases * c.mlp_bias

    if c.num_experts:
        ffn = c.num_experts * mlp(c.moe_intermediate_size) + h * c.num_experts
        ffn += mlp(c.shared_expert_intermediate_size) if c.shared_expert_intermediate_size else 0
    else:
        ffn = mlp(c.intermediate_size)
    total = c.num_hidden_layers * (attention + ffn + 2 * norm) + norm
    total += c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    total += c.max_position_embeddings * h if c.position_embedding == "learned" else 0
    return total


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_with_the_expected_parameter_count(name):
    config = MiniGPTConfig.from_preset(name)
    with torch.device("meta"):
        model = MiniGPT(config)
    assert model.num_parameters() == expected_parameter_count(config)


def test_preset_sizes_are_as_advertised():
    def millions(name):
        with torch.device("meta"):
            return MiniGPT(MiniGPTConfig.from_preset(name)).num_parameters() / 1e6

    assert 0.8 < millions("tiny") < 1.3
    assert 28 < millions("small") < 34
    assert 124 < millions("gpt2") < 125  # GPT-2 small: 124.4M
    assert 25 < millions("minimind-26m") < 27


def test_flops_per_token_matches_a_hand_computation():
    c = MiniGPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    # Per layer: q 64·64, k and v 64·32 each, o 64·64 → 12288; SwiGLU 3·64·128 = 24576. Head 64·1000.
    weights = 2 * (12288 + 24576) + 64_000  # 137_728
    attention = 4 * 2 * 100 * 64  # 4 · layers · T · (heads · head_dim), T = 100
    assert c.flops_per_token(100, training=False) == 2 * weights + attention
    assert c.flops_per_token(100) == 3 * (2 * weights + attention)


def test_loss_is_the_mean_cross_entropy_of_shifted_labels():
    model = build()
    ids = torch.randint(0, 97, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(9) if labels[b, t + 1] != -100]
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert causal_lm_loss(out.logits, torch.full_like(ids, -100)).item() == 0.0


def test_overfitting_one_batch_drives_the_loss_near_zero():
    model = build(dropout=0.0)
    model.train()
    ids = torch.randint(0, 97, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 16))
    grads = []
    for enabled in (False, True):
        model = build(seed=5, num_key_value_heads=2).train()
        model.gradient_checkpointing_enable(enabled)
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    for variant in ("moe", "learned", "qknorm_bias_untied"):
        model = build(**VARIANTS[variant])
        model.save_pretrained(tmp_path / variant)
        loaded = MiniGPT.from_pretrained(tmp_path / variant).eval()
        ids = torch.randint(0, 97, (2, 8))
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert loaded.config == model.config
        if model.config.tie_word_embeddings:
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_too_long_sequences_are_refused():
    model = build()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("overrides, field", [
    (dict(hidden_size=100, num_attention_heads=8), "num_attention_heads"),
    (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(norm_type="batchnorm"), "norm_type"),
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(mlp_type="relu"), "mlp_type"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(eos_token_id=5000), "eos_token_id"),
])
def test_invalid_configs_fail_at_construction_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        MiniGPTConfig(**{**SMALL, **overrides})


def test_unknown_preset_and_unknown_field_are_refused():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        MiniGPTConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="hidden_sise"):
        MiniGPTConfig.from_dict({"hidden_sise": 3})


def test_get_tiny_config_is_the_tiny_preset():
    config = get_tiny_config()
    assert config == MiniGPTConfig.from_preset("tiny")
    assert math.isclose(MiniGPT(config).num_parameters() / 1e6, 1.05, abs_tol=0.1)
