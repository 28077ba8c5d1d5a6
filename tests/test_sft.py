"""SFT: the trainer learns the assistant replies of conversations."""

import torch

from minillm.data.builtin import builtin_sft_conversations
from minillm.data.sft import ConversationDataset
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.training.trainer import SFTTrainer


def test_sft_lowers_the_loss_on_assistant_replies(tokenizer):
    conversations = builtin_sft_conversations(400, seed=11)
    train = ConversationDataset(conversations[40:], tokenizer, max_length=96)
    val = ConversationDataset(conversations[:40], tokenizer, max_length=96)
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=128))
    trainer = SFTTrainer(model, tokenizer, train_data=train, eval_data=val, max_steps=60, batch_size=16, lr=3e-3,
                         warmup_steps=5, eval_batches=0, precision="fp32", progress=False)
    before = trainer.evaluate()["val_loss"]
    after = trainer.train()["val_loss"]
    print(f"assistant-token validation loss {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before
