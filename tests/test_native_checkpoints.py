"""Checkpoints are native transformers directories: `MiniGPT.save_pretrained` writes the family that computes
the same function (config.json, tensor names and layout), so `AutoModelForCausalLM` loads a checkpoint as
it is, with no export and no trust_remote_code; our own settings ride along under "minillm" and come back
exactly. A config no family expresses stays `model_type: minillm`, with a warning naming the field."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from minillm.cli import main  # noqa: E402
from minillm.model import MiniGPT, MiniGPTConfig  # noqa: E402
from minillm.model.hf import config_from_hf  # noqa: E402
from minillm.model.weights import read_checkpoint_weights  # noqa: E402

VOCAB = 300
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=48, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def hf_model(family: str, tied: bool = False):
    """A small random transformers model of `family`, its norms and biases away from their defaults."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_class, model_class, fields = FAMILIES[family]
        config = getattr(transformers, config_class)(vocab_size=VOCAB, tie_word_embeddings=tied,
                                                     bos_token_id=1, eos_token_id=2, **{**COMMON, **fields})
        model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0, 0.2)
    return model.eval()


def tensor_names(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name for name in f.keys() if not name.endswith((".attn.bias", ".attn.masked_bias"))}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False),
                                              ("qwen3_moe", False), ("mixtral", True), ("gpt2", True),
                                              ("gpt2", False)])
def test_a_saved_model_loads_in_transformers_as_it_is(family, tied, tmp_path):
    original = hf_model(family, tied)
    original.save_pretrained(tmp_path / "hf")
    ours = MiniGPT.from_pretrained(tmp_path / "hf").eval()
    ours.save_pretrained(tmp_path / "ours")

    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [type(original).__name__]
    assert MiniGPTConfig.from_dict(config["minillm"]) == ours.config
    names, expected = tensor_names(tmp_path / "ours"), tensor_names(tmp_path / "hf")
    if tied:
        expected.discard("lm_head.weight")
    assert names == expected  # as transformers writes them (GPT-2's c_attn, Mixtral's experts), a tied head left out

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(reloaded) is type(original)
    again = MiniGPT.from_pretrained(tmp_path / "ours").eval()
    assert again.config == ours.config
    with torch.no_grad():
        reference = original(IDS).logits
        assert max_diff(reloaded(IDS).logits, reference) <= 1e-4
        assert max_diff(again(IDS).logits, reference) <= 1e-4
    for name, tensor in ours.state_dict().items():  # bit-identical: renames, splits and transposes only
        assert torch.equal(again.state_dict()[name], tensor), name


def test_our_settings_the_family_cannot_state_come_back_exactly(tmp_path):
    config = MiniGPTConfig.from_preset("tiny", vocab_size=VOCAB, dropout=0.1, initializer_range=0.05,
                                       extra={"note": "kept"})
    model = MiniGPT(config)
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["model_type"] == "llama" and data["minillm"]["extra"] == {"note": "kept", "preset": "tiny"}
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "m")  # the extra key is tolerated
    assert hf_config.model_type == "llama" and hf_config.minillm["dropout"] == 0.1
    assert MiniGPT.from_pretrained(tmp_path / "m").config == config
    assert config_from_hf(data).dropout == 0.0  # what the family alone would say
    # A transformers round trip (load, save) keeps the settings too.
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").save_pretrained(tmp_path / "again")
    assert MiniGPT.from_pretrained(tmp_path / "again").config == config


def test_the_family_fields_win_when_they_were_changed(tmp_path):
    model = MiniGPT(MiniGPTConfig.from_preset("tiny", vocab_size=VOCAB))
    model.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    hf.resize_token_embeddings(VOCAB + 20)
    hf.save_pretrained(tmp_path / "resized")
    resized = MiniGPT.from_pretrained(tmp_path / "resized").eval()
    assert resized.config.vocab_size == VOCAB + 20 and resized.config.extra == {"preset": "tiny"}
    with torch.no_grad():
        assert max_diff(resized(IDS).logits, hf.eval()(IDS).logits) <= 1e-4


def test_a_config_without_a_family_stays_ours_with_a_warning(tmp_path, caplog):
    config = MiniGPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, norm_type="layernorm")
    model = MiniGPT(config).eval()
    with caplog.at_level(logging.WARNING, logger="minillm"):
        model.save_pretrained(tmp_path / "m")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model_type 'minillm'" in warnings[0]
    assert "position_embedding='rope'" in warnings[0]  # the field that prevents GPT-2, its closest family
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["model_type"] == "minillm" and data["norm_type"] == "layernorm"
    again = MiniGPT.from_pretrained(tmp_path / "m").eval()
    assert again.config == config
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minillm"):
        model.save_pretrained(tmp_path / "m2")  # once per model, not at every checkpoint of a run
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_training_run_writes_checkpoints_transformers_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "builtin", "--max-length", "32", "--batch-size", "8",
                 "--precision", "fp32", "data.num_documents=40", "data.val_fraction=0.1",
                 "tokenizer.vocab_size=300", "model.hidden_size=32", "model.num_hidden_layers=1",
                 "model.intermediate_size=64", "training.progress=false", "training.warmup_steps=2",
                 "--max-steps", "2", "--out-dir", str(out)]) == 0
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    ours = MiniGPT.from_pretrained(final).eval()
    ids = torch.tensor([hf_tokenizer.encode("小明有3个苹果。Tom has 5 apples.")])
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids).logits) <= 1e-4
    state, _ = read_checkpoint_weights(final)
    for name, tensor in state.items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_a_gpt2_config_keeps_its_50256_on_a_smaller_vocabulary(tmp_path, caplog):
    """transformers' GPT2Config defaults bos/eos_token_id to 50256 whatever the vocabulary: such a model
    loads, its out-of-vocabulary special tokens read as None, with a warning saying so."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert config.bos_token_id == config.eos_token_id == 50256
    original = transformers.GPT2LMHeadModel(config).eval()
    original.save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="minillm"):
        model = MiniGPT.from_pretrained(tmp_path / "hf").eval()
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "bos_token_id=50256 is outside the vocabulary [0, 300)" in messages and "eos_token_id=50256" in messages
    with torch.no_grad():
        assert max_diff(model(IDS).logits, original(IDS).logits) <= 1e-4
