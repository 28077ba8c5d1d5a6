"""`MiniGPT.from_pretrained` on Hugging Face directories: a randomly initialised transformers Llama, Qwen2
or Qwen3, saved with `save_pretrained` (safetensors or PyTorch weights, sharded or not), loads here with
the same logits and trains; what our model cannot compute exactly is refused by field."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.cli import main  # noqa: E402
from minillm.data.builtin import builtin_sft_conversations  # noqa: E402
from minillm.data.sft import ConversationDataset  # noqa: E402
from minillm.export.hf import ExportError  # noqa: E402
from minillm.model import MiniGPT  # noqa: E402
from minillm.training.trainer import SFTTrainer  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                 moe_intermediate_size=48, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                             rope_theta=1e6)),
}


def hf_model(family: str, vocab_size: int, tied: bool = False, **extra):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                         n_inner=96, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         initializer_range=0.1, tie_word_embeddings=tied, bos_token_id=1,
                                         eos_token_id=2, **extra)
        model = transformers.GPT2LMHeadModel(config).eval()
    else:
        config_class, model_class, fields = FAMILIES[family]
        config = getattr(transformers, config_class)(vocab_size=vocab_size, tie_word_embeddings=tied,
                                                     **{**COMMON, **fields, **extra})
        model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # nonzero norms and biases, so that a dropped or misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0, 0.2)
    return model


@pytest.mark.parametrize(("family", "tied", "serialization"), [
    ("llama", False, "safetensors"), ("llama", True, "sharded"), ("qwen2", False, "bin"),
    ("qwen2", True, "safetensors"), ("qwen3", False, "sharded_bin"), ("qwen3", True, "safetensors"),
    ("gpt2", True, "safetensors"), ("gpt2", False, "bin"), ("qwen3_moe", False, "safetensors"),
    ("qwen3_moe", True, "sharded"), ("mixtral", False, "safetensors"), ("mixtral", True, "bin")])
def test_hugging_face_models_load_with_the_same_logits(family, tied, serialization, tokenizer, tmp_path):
    hf = hf_model(family, len(tokenizer), tied)
    options = {"safetensors": {}, "sharded": {"max_shard_size": "100KB"},
               "bin": {"safe_serialization": False},
               "sharded_bin": {"safe_serialization": False, "max_shard_size": "100KB"}}[serialization]
    try:
        hf.save_pretrained(tmp_path / "hf", **options)
    except TypeError:
        pytest.skip(f"this transformers cannot save {serialization}")
    model = MiniGPT.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode("小明有3个苹果。Tom has 5 apples.")])
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt2"])
def test_an_imported_model_fine_tunes_and_saves_in_its_family(family, tokenizer, tmp_path):
    hf_model(family, len(tokenizer)).save_pretrained(tmp_path / "hf")
    model = MiniGPT.from_pretrained(tmp_path / "hf")
    data = ConversationDataset(builtin_sft_conversations(16, seed=0), tokenizer, max_length=64)
    trainer = SFTTrainer(model, tokenizer, train_data=data, batch_size=8, max_steps=2, precision="fp32",
                         progress=False, lr=1e-3)
    first = trainer.evaluate(data)["val_loss"]
    trainer.train()
    assert trainer.evaluate(data)["val_loss"] < first
    model.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == family  # a checkpoint of ours stays in the family transformers loads
    assert saved["minillm"]["qkv_bias"] is (family in ("llama", "qwen2", "gpt2"))
    assert MiniGPT.from_pretrained(tmp_path / "ours").config == model.config


def test_a_hugging_face_tokenizer_with_its_chat_template_loads(tmp_path):
    """A byte-level BPE tokenizer saved by transformers with a Qwen-style ChatML template: our tokenizer
    reads it, its chat ids equal transformers', and the assistant mask covers the reply and its end token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minillm.data.builtin import builtin_corpus
    from minillm.data.formats import Message
    from minillm.tokenizer import BPETokenizer
    from minillm.tokenizer.chat import encode_chat

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(builtin_corpus(300), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", chat_template=template)
    fast.save_pretrained(tmp_path / "tok")
    ours = BPETokenizer.from_pretrained(tmp_path / "tok")
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "3 + 4 = ?"},
                {"role": "assistant", "content": "3 + 4 = 7。答案：7"}]
    for turns, prompt in ((messages, False), (messages[:2], True)):
        theirs = fast.apply_chat_template(turns, tokenize=True, add_generation_prompt=prompt)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
        assert list(theirs) == ours.apply_chat_template(turns, add_generation_prompt=prompt)
    ids, mask = encode_chat(ours, [Message(**m) for m in messages])
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == "3 + 4 = 7。答案：7<|im_end|>"
    assert (ours.eos_token_id, ours.pad_token_id) == (2, 0)


@pytest.mark.parametrize(("extra", "field"), [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE type 'linear'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="mixtral", sliding_window=16, max_position_embeddings=64), "sliding_window=16"),
    (dict(model_type="gpt2", activation_function="relu", n_embd=16, n_layer=1, n_head=2), "activation_function='relu'"),
])
def test_what_cannot_be_computed_exactly_is_refused(extra, field, tmp_path):
    config = {**dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2), **extra}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=field.replace("(", r"\(")):
        MiniGPT.from_pretrained(tmp_path / "m")


def test_an_unsupported_architecture_is_refused(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ExportError, match="model_type='mamba' cannot be read; supported: llama, qwen2, qwen3"):
        MiniGPT.from_pretrained(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi"]) != 0
    assert "model_type='mamba'" in capsys.readouterr().err
