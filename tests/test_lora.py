"""LoRA: starts as the base model, trains only adapters, merges exactly, saves only the adapter."""

import copy
import json

import pytest
import torch

from minillm.model import MiniGPT, MiniGPTConfig
from minillm.model.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from minillm.model.transformer import WEIGHTS_FILE

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)


def build(seed: int = 0, **overrides) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig(**{**SMALL, **overrides})).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(seed))


def train(model: MiniGPT, ids: torch.Tensor, steps: int = 8) -> list[float]:
    # lr high enough that B moves far from 0 in a few steps, so the merge tests are not trivial.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained():
    """(base model, trained LoRA model, input ids), shared because training is the slow part."""
    base = build()
    ids = batch()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, target_modules="all-linear"))
    losses = train(model, ids)
    return base, model, ids, losses


def test_fresh_adapter_gives_exactly_the_base_logits():
    base = build()
    model = apply_lora(copy.deepcopy(base), LoRAConfig())
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_training_changes_only_lora_parameters_and_lowers_the_loss(trained):
    base, model, _, losses = trained
    assert losses[-1] < losses[0] - 0.1, losses
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    after = model.state_dict()
    for name, before in base.state_dict().items():
        wrapped = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        now = after.get(name, after.get(wrapped))
        assert now is not None, name
        assert torch.equal(now, before), f"{name} changed"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora_state_dict(model).items()
               if k.endswith("lora_B"))


def test_merge_matches_adapter_and_gives_a_plain_model(trained, tmp_path):
    base, model, ids, _ = trained
    model = copy.deepcopy(model)
    with torch.no_grad():
        adapted = model(ids).logits
        assert not torch.allclose(adapted, base(ids).logits, atol=1e-3)  # the adapter does something
        merged = merge_lora(model)
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert list(merged.state_dict()) == list(base.state_dict())
    assert all(p.requires_grad for p in merged.parameters())

    merged.save_pretrained(tmp_path)
    reloaded = MiniGPT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged(ids).logits)


def test_save_and_load_adapter_reproduce_the_logits(trained, tmp_path):
    base, model, ids, _ = trained
    save_lora(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["all-linear"]

    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    assert set(saved) == set(lora_state_dict(model))
    assert all(k.endswith(("lora_A", "lora_B")) for k in saved)
    assert "model.layers.0.self_attn.q_proj.lora_A" in saved

    base.save_pretrained(tmp_path / "base")
    adapter_size = (tmp_path / ADAPTER_WEIGHTS_FILE).stat().st_size
    assert adapter_size * 3 < (tmp_path / "base" / WEIGHTS_FILE).stat().st_size

    with torch.no_grad():
        expected = model(ids).logits
        applied = load_lora(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, target_modules="all-linear")),
                            tmp_path)
        assert torch.equal(applied(ids).logits, expected)
        from_config = load_lora(copy.deepcopy(base), tmp_path)  # no adapters yet: applied from the file
        assert torch.equal(from_config(ids).logits, expected)


def test_loading_a_mismatched_state_names_the_keys(trained):
    base, model, _, _ = trained
    fresh = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))  # attention only
    with pytest.raises(ValueError, match=r"unexpected keys \[.*mlp\.down_proj\.lora_A"):
        load_lora_state_dict(fresh, lora_state_dict(model))
    state = lora_state_dict(fresh)
    state.pop("model.layers.1.self_attn.v_proj.lora_B")
    with pytest.raises(ValueError, match=r"missing keys \['model\.layers\.1\.self_attn\.v_proj\.lora_B'\]"):
        load_lora_state_dict(fresh, state)
    wrong_rank = lora_state_dict(apply_lora(copy.deepcopy(base), LoRAConfig(rank=2)))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_lora_state_dict(fresh, wrong_rank)


@pytest.mark.parametrize("overrides", [dict(), dict(num_experts=4, num_experts_per_tok=2)], ids=["dense", "moe"])
def test_all_linear_wraps_every_linear_but_lm_head(overrides):
    model = build(**overrides)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    apply_lora(model, LoRAConfig(target_modules="all-linear"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == linear_names
    assert not isinstance(model.lm_head, LoRALinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    if overrides:
        assert "model.layers.0.mlp.experts.0.gate_proj" in wrapped


def test_default_targets_are_the_attention_projections():
    model = apply_lora(build(), LoRAConfig())
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                       for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert model.lora_config.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(target_modules=()), "target_modules"),
])
def test_bad_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_unmatched_targets_are_named_with_the_available_layers():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no linear layer.*down_proj, gate_proj, "
                                         r"k_proj, o_proj, q_proj, up_proj, v_proj$"):
        apply_lora(build(), LoRAConfig(target_modules=("q_proj", "qkv_proj")))


def test_lm_head_is_never_wrapped_when_tied_and_applying_twice_is_refused():
    with pytest.raises(ValueError, match="lm_head.*tied"):
        apply_lora(build(), LoRAConfig(target_modules=("lm_head",)))
    untied = apply_lora(build(tie_word_embeddings=False), LoRAConfig(target_modules=("lm_head",)))
    assert isinstance(untied.lm_head, LoRALinear)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(untied, LoRAConfig())
