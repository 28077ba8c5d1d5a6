"""`minillm export hf`: a model of ours, saved as a native Llama / Qwen2 / Qwen3 directory, loads in
transformers (no trust_remote_code) with the same logits and greedy continuation; the tokenizer and its
chat template come along; unsupported configs are refused naming the field."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.cli import main  # noqa: E402
from minillm.export.hf import ExportError, export_hf  # noqa: E402
from minillm.inference.generator import GenerationConfig, TextGenerator  # noqa: E402
from minillm.model import MiniGPT, MiniGPTConfig  # noqa: E402
from minillm.model.hf import hf_family  # noqa: E402
from minillm.model.lora import LoRAConfig, apply_lora  # noqa: E402

FAMILIES = {
    "llama": dict(),
    "llama_biases_untied": dict(qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "qwen2": dict(qkv_bias=True, out_bias=False),
    "qwen3": dict(qk_norm=True, head_dim=24),
    "qwen3_moe": dict(qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
    "qwen3_moe_norm_topk": dict(qk_norm=True, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                qkv_bias=True, out_bias=True),
    "mixtral": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, tie_word_embeddings=False),
    "gpt2": dict(norm_type="layernorm", position_embedding="learned", mlp_type="gelu", qkv_bias=True, out_bias=True,
                 mlp_bias=True, num_key_value_heads=4),
    "gpt2_untied": dict(norm_type="layernorm", position_embedding="learned", mlp_type="gelu", qkv_bias=True,
                        out_bias=True, mlp_bias=True, num_key_value_heads=4, tie_word_embeddings=False),
}


def model_for(tokenizer, **fields) -> MiniGPT:
    torch.manual_seed(0)
    config = MiniGPTConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                     max_position_embeddings=128, initializer_range=0.1,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id), **fields})
    return MiniGPT(config).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_models_match_in_transformers(name, tokenizer, tmp_path):
    model = model_for(tokenizer, **FAMILIES[name])
    out = export_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == name.replace("_untied", "").replace("_biases", "").replace("_norm_topk", "") \
        == hf_family(model.config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == config["architectures"][0]
    ids = torch.tensor([tokenizer.encode("小明有3个苹果，Tom has 5 apples.")])
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    greedy = TextGenerator(model, tokenizer).generate(ids[0].tolist(), GenerationConfig(max_new_tokens=12,
                                                                                       do_sample=False,
                                                                                       stop_token_ids=[]))
    hf_greedy = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf_greedy[0, ids.shape[1]:].tolist() == greedy


def test_the_exported_tokenizer_gives_our_chat_ids(tokenizer, tmp_path):
    out = export_hf(model_for(tokenizer), tmp_path / "hf", tokenizer=tokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "3 + 4 = ?"}]
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert list(theirs) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    generation = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.im_end_id in generation["eos_token_id"]


def test_large_models_are_sharded_with_an_index_and_dtype_is_chosen(tokenizer, tmp_path):
    model = model_for(tokenizer, tie_word_embeddings=False)
    out = export_hf(model, tmp_path / "hf", dtype="bfloat16", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    torch.testing.assert_close(hf.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_lora_is_merged_on_export(tokenizer, tmp_path):
    model = model_for(tokenizer)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("fields", "field"), [
    (dict(norm_type="layernorm"), "closest: GPT-2.*\n.*position_embedding='rope'"),
    (dict({**FAMILIES["gpt2"], "num_key_value_heads": 2}), "num_key_value_heads=2: GPT-2 has full multi-head"),
    (dict(qkv_bias=False, out_bias=True), "qkv_bias=False, out_bias=True"),
    (dict(qk_norm=True, qkv_bias=True, out_bias=False), "qkv_bias=True, out_bias=False"),
    (dict(num_experts=4, norm_topk_prob=False), "norm_topk_prob=False: Mixtral always renormalises"),
    (dict(num_experts=4, qkv_bias=True, out_bias=True), "Mixtral's attention has no biases"),
    (dict(num_experts=4, qk_norm=True, shared_expert_intermediate_size=32), "shared_expert_intermediate_size=32"),
])
def test_configs_without_a_native_counterpart_are_refused_by_field(fields, field, tokenizer, tmp_path):
    with pytest.raises(ExportError, match=field):
        export_hf(model_for(tokenizer, **fields), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_hf_command(tokenizer, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    model_for(tokenizer, qk_norm=True).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    assert main(["export", "hf", str(checkpoint), "--out", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert "qwen3" in capsys.readouterr().out
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.model_type == "qwen3"
    bad = tmp_path / "bad"
    model_for(tokenizer, norm_type="layernorm").save_pretrained(bad)
    assert main(["export", "hf", str(bad), "--out", str(tmp_path / "x")]) != 0
    assert "position_embedding='rope'" in capsys.readouterr().err
