"""`minillm.model.hf`: a converted `LlamaForCausalLM` computes what `MiniGPT` computes (logits, padded
batches, greedy continuations), and configs Llama cannot express are refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.inference import TextGenerator
from minillm.model import MiniGPT, MiniGPTConfig, get_tiny_config
from minillm.model.hf import to_llama_config, to_transformers

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=128,
             initializer_range=0.3)  # wide weights: greedy output that does not just repeat one token
CONFIGS = {
    # The tiny preset as shipped: GQA 4/2, tied embeddings.
    "tiny_gqa_tied": lambda: get_tiny_config(initializer_range=0.3),
    "mha_untied": lambda: MiniGPTConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=False),
    # Every other mapped field away from its default: MQA, an explicit head_dim that differs from
    # hidden/heads, all biases, another θ and eps, pad/bos/eos ids.
    "mqa_biases_head_dim": lambda: MiniGPTConfig(
        **SMALL, num_key_value_heads=1, head_dim=32, qkv_bias=True, out_bias=True, mlp_bias=True,
        rope_theta=500.0, norm_eps=1e-3, bos_token_id=1, eos_token_id=2, pad_token_id=3),
}


def build(config: MiniGPTConfig, seed: int = 0) -> MiniGPT:
    """A random model whose norm weights and biases are random too (they start at 1 and 0, where a
    mis-mapped or dropped one would go unnoticed)."""
    torch.manual_seed(seed)
    model = MiniGPT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request) -> tuple[MiniGPT, torch.nn.Module]:
    model = build(CONFIGS[request.param]())
    return model, to_transformers(model)


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_config_fields_are_mapped():
    config = CONFIGS["mqa_biases_head_dim"]()
    llama = to_llama_config(config)
    rope_theta = llama.rope_parameters["rope_theta"] if hasattr(llama, "rope_parameters") else llama.rope_theta
    assert rope_theta == 500.0
    assert (llama.head_dim, llama.num_attention_heads, llama.num_key_value_heads) == (32, 4, 1)
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (64, 128, 2)
    assert (llama.rms_norm_eps, llama.max_position_embeddings, llama.vocab_size) == (1e-3, 128, 300)
    assert (llama.attention_bias, llama.mlp_bias, llama.hidden_act) == (True, True, "silu")
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 3)
    assert to_llama_config(get_tiny_config()).tie_word_embeddings is True
    assert to_llama_config(CONFIGS["mha_untied"]()).tie_word_embeddings is False


def test_every_config_field_was_reviewed():
    """A new MiniGPTConfig field (rope scaling, say) must be mapped or refused in hf.py; this fails
    until someone has decided which, and added it here."""
    reviewed = {
        # mapped
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "max_position_embeddings", "norm_eps", "rope_theta", "qkv_bias",
        "out_bias", "mlp_bias", "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
        "pad_token_id",
        # refused unless Llama's value
        "norm_type", "position_embedding", "mlp_type", "qk_norm", "num_experts",
        # MoE only (refused), training only, or metadata
        "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
        "router_aux_loss_coef", "dropout", "extra",
    }
    assert {f.name for f in dataclasses.fields(MiniGPTConfig)} == reviewed


def test_weights_are_copied_and_tied_as_ours(pair):
    model, llama = pair
    assert isinstance(llama, transformers.LlamaForCausalLM) and not llama.training
    assert all(p.dtype == torch.float32 for p in llama.parameters())
    tied = llama.lm_head.weight is llama.model.embed_tokens.weight
    assert tied == model.config.tie_word_embeddings
    assert llama.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # a copy


def test_same_logits(pair):
    model, llama = pair
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 24))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert ours.shape == theirs.shape == (3, 24, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_same_logits_with_left_padding(pair):
    model, llama = pair
    torch.manual_seed(2)
    rows = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (20, 13, 5)]
    ids, mask = left_padded(rows, pad=7)
    # transformers' forward counts positions from column 0; ours from each row's first real token.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = llama(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()  # padding positions' outputs are arbitrary in both models
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_same_greedy_continuation(pair):
    model, llama = pair
    torch.manual_seed(3)
    rows = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in (9, 4, 12)]
    ours = TextGenerator(model).generate(rows, max_new_tokens=20, do_sample=False, stop_token_ids=[])
    ids, mask = left_padded(rows, pad=model.config.pad_token_id or 0)
    llama.generation_config.eos_token_id = None  # no early stop, as stop_token_ids=[]
    with torch.no_grad():
        output = llama.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                pad_token_id=model.config.pad_token_id or 0)
    theirs = output[:, ids.shape[1]:].tolist()
    assert all(len(set(r)) > 5 for r in ours)  # a varied continuation, so the comparison means something
    assert ours == theirs


def test_saved_model_loads_with_auto_class(tmp_path):
    model = build(CONFIGS["mha_untied"]())
    to_transformers(model).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(norm_type="layernorm"), "norm_type"),
    (dict(position_embedding="learned"), "position_embedding"),
    (dict(mlp_type="gelu"), "mlp_type"),
    (dict(num_experts=4), "num_experts"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(qkv_bias=True), "qkv_bias"),  # q/k/v bias without o bias (Qwen2-style)
    (dict(hidden_size=60, num_attention_heads=8, head_dim=8), "hidden_size"),
])
def test_refuses_what_llama_cannot_express(overrides, field):
    config = MiniGPTConfig(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match=rf"{field}=") as raised:
        to_llama_config(config)
    assert "Llama" in str(raised.value)
    with pytest.raises(ValueError, match=rf"{field}="):
        to_transformers(MiniGPT(config))


def test_refusal_lists_every_problem():
    config = MiniGPTConfig.from_preset("gpt-micro", vocab_size=300)  # LayerNorm, learned, GELU, biases
    with pytest.raises(ValueError) as raised:
        to_llama_config(config)
    for field in ("norm_type=", "position_embedding=", "mlp_type="):
        assert field in str(raised.value)


def test_refuses_unmerged_lora():
    from minillm.model.lora import LoRAConfig, apply_lora

    model = apply_lora(MiniGPT(MiniGPTConfig(**SMALL)), LoRAConfig())
    with pytest.raises(ValueError, match="LoRA"):
        to_transformers(model)
