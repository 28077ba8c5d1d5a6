"""The building blocks of `MiniGPT`, one class per concept, named as in Hugging Face's Llama/Qwen code.

Shapes: B batch, T new tokens, S = past + T key positions (S_max: a static cache's capacity), H query
heads, K key/value heads, D head dim, C hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.model.config import MiniGPTConfig


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 for stability under bf16/fp16."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x · rsqrt(mean(x²) + eps) in one call (a third fewer ops per token when decoding)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(config: MiniGPTConfig, dim: int | None = None) -> nn.Module:
    dim = config.hidden_size if dim is None else dim
    if config.norm_type == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class RotaryEmbedding(nn.Module):
    """RoPE tables in the `rotate_half` layout (first half of each head paired with the second half)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.max_positions = max_positions
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, D/2)
        emb = torch.cat((angles, angles), dim=-1)  # (P, D)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `position_ids` (B, T), shaped (B, 1, T, D) to broadcast over heads."""
        cos = self.cos_cached[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin_cached[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of past positions, one (B, K, S, D) pair per layer.

    With `max_length` the buffers are allocated once and written in place, so decoding does no
    reallocation per token; without it, each step concatenates (simple, fine for short outputs).
    """

    def __init__(self, num_layers: int, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @classmethod
    def from_tensors(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """A cache holding the given (B, K, S, D) past keys and values, one per layer (S may be 0); it grows
        by concatenation (the functional form an exported graph takes and returns)."""
        cache = cls(len(keys))
        cache.keys, cache.values = list(keys), list(values)
        cache.lengths = [k.shape[2] for k in keys]
        return cache

    @property
    def seq_len(self) -> int:
        """Positions cached so far (read before a forward pass: layers update one after another)."""
        return self.lengths[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam search: each surviving beam takes its parent's past)."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is None:
                continue
            n = self.lengths[layer]
            if self.max_length is None:
                self.keys[layer], self.values[layer] = k.index_select(0, index), v.index_select(0, index)
            else:
                k[:, :, :n] = k[index, :, :n]
                v[:, :, :n] = v[index, :, :n]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, new = self.lengths[layer], k.shape[2]
        end = start + new
        if self.max_length is None:
            if self.keys[layer] is None:
                self.keys[layer], self.values[layer] = k, v
            else:
                self.keys[layer] = torch.cat((self.keys[layer], k), dim=2)
                self.values[layer] = torch.cat((self.values[layer], v), dim=2)
            self.lengths[layer] = end
            return self.keys[layer], self.values[layer]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class StaticKVCache:
    """Keys and values in fixed-shape (B, K, S_max, D) buffers, one pair per layer, written in place at
    positions given as a tensor (`cache_position`).

    Every forward returns the whole buffers and attends through an explicit mask of the positions that
    are filled and not padding, so a one-token decode step has the same shapes and the same Python state
    at every position: what `torch.compile(fullgraph=True)` and CUDA graphs need. The cache keeps no
    count of filled positions; the caller knows where it writes. Allocated once, it can be reused for
    any number of generations of the same batch size (positions are overwritten, the mask hides the rest).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.shape = (batch, num_kv_heads, capacity, head_dim)
        self.device = torch.device(device or "cpu")
        # `dtype` None: the buffers take the dtype of the first keys written (under autocast that depends on
        # the architecture: a QK-norm returns fp32 keys, a plain projection bf16 ones), as KVCache does
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        if dtype is not None:
            for layer in range(num_layers):
                self._allocate(layer, dtype)

    def _allocate(self, layer: int, dtype: torch.dtype) -> None:
        self.keys[layer] = torch.zeros(self.shape, device=self.device, dtype=dtype)
        self.values[layer] = torch.zeros(self.shape, device=self.device, dtype=dtype)
        if self.device.type == "cuda":  # CUDA graphs may then write them in place
            torch._dynamo.mark_static_address(self.keys[layer])
            torch._dynamo.mark_static_address(self.values[layer])

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, K, T, D) keys and values at positions `cache_position` (T,); the whole buffers."""
        if self.keys[layer] is None:  # the first write (a prefill, eager) allocates
            self._allocate(layer, k.dtype)
        self.keys[layer].index_copy_(2, cache_position, k.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(2, cache_position, v.to(self.values[layer].dtype))
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA when K = H, MQA when K = 1)."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.dropout = config.dropout
        c, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(c, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(c, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(c, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, c, bias=config.out_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = may attend; None = plain causal
        cache: KVCache | StaticKVCache | None,
        cache_position: torch.Tensor | None = None,  # (T,) slots of a StaticKVCache (then `mask` is required)
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if isinstance(cache, StaticKVCache):
            k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, K, S_max, D)
        elif cache is not None:
            past = cache.lengths[self.layer_idx]
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        if mask is None and t > 1 and past > 0:
            raise ValueError("several new tokens after a KV cache need an explicit mask")
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            # Without a mask: causal over the new tokens; a single new token after a cache sees everything.
            is_causal=mask is None and t > 1 and past == 0,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (down(silu(gate(x)) · up(x))) or GPT-2's GELU MLP (down(gelu(up(x))))."""

    def __init__(self, config: MiniGPTConfig, intermediate_size: int) -> None:
        super().__init__()
        c, bias = config.hidden_size, config.mlp_bias
        self.swiglu = config.mlp_type == "swiglu"
        self.gate_proj = nn.Linear(c, intermediate_size, bias=bias) if self.swiglu else None
        self.up_proj = nn.Linear(c, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, c, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class MoE(nn.Module):
    """Top-k routed experts (softmax router, as Qwen-MoE/Mixtral) plus an optional always-on shared expert.

    Returns the output and the Switch-Transformer load-balancing loss E · Σ_e f_e · P_e, where f_e is
    the fraction of routed slots that went to expert e and P_e the mean router probability of e;
    it is 1 when the load is perfectly balanced.
    """

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, config.moe_intermediate_size) for _ in range(config.num_experts))
        shared = config.shared_expert_intermediate_size
        self.shared_expert = MLP(config, shared) if shared > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        load = F.one_hot(chosen, self.num_experts).float().sum(dim=(0, 1)) / chosen.numel()  # f_e
        aux_loss = self.num_experts * (load * probs.mean(dim=0)).sum()
        return out.view(shape), aux_loss


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MoE(config) if config.is_moe else MLP(config, config.intermediate_size)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | StaticKVCache | None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self._dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_position))
        mlp_out = self.mlp(self.post_attention_layernorm(h))
        aux_loss = None
        if isinstance(mlp_out, tuple):
            mlp_out, aux_loss = mlp_out
        return h + self._dropout(mlp_out), aux_loss

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Residual dropout; in eval (and with p = 0) not even a call, which matters per decoded token."""
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x
