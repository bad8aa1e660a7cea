"""A PyTorch InternLM2 for parity tests: transformers has no InternLM2 class.

Written from the official `modeling_internlm2.py` (InternVL's copy, chat spec 2.1), keeping what
decides the numbers: the fused `wqkv` viewed as (kv_heads, groups + 2, head_dim) rows, RMSNorm in
float32, rotate-half RoPE from cos/sin tables indexed by position, the stateful rotary classes
(`linear` divides the table's positions; dynamic NTK is keyed on the key length including the
cache, changes the base only past max_position_embeddings, rebuilds the table when the length
grows and never shrinks it back), the eager attention with a float32 softmax, and the
(key, value) tuples of its cache. Left out: dropout, flash attention, gradient checkpointing.
The one deliberate difference: masked logits are set to the float minimum rather than summed
with it, so that a left-padding query whose keys are all padding stays finite.
"""

import dataclasses
import math

import torch
from torch import nn


@dataclasses.dataclass
class InternLM2Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  max_position_embeddings: int
  rope_theta: float
  rope_scaling: dict | None  # {"type": "linear" | "dynamic", "factor": float}
  rms_norm_eps: float


class RMSNorm(nn.Module):

  def __init__(self, width, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(width))
    self.variance_epsilon = eps

  def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
  """`InternLM2RotaryEmbedding` and its two scaled subclasses, one class with a `scaling` switch."""

  def __init__(self, dim, max_position_embeddings, base, scaling=None):
    super().__init__()
    self.dim, self.max_position_embeddings, self.base = dim, max_position_embeddings, base
    self.kind = None if scaling is None else scaling["type"]
    self.scaling_factor = None if scaling is None else scaling["factor"]
    inv_freq = 1.0 / (self.base**(torch.arange(0, self.dim, 2).float() / self.dim))
    self.register_buffer("inv_freq", inv_freq, persistent=False)
    self._set_cos_sin_cache(max_position_embeddings, torch.float32)

  def _set_cos_sin_cache(self, seq_len, dtype):
    self.max_seq_len_cached = seq_len
    if self.kind == "dynamic" and seq_len > self.max_position_embeddings:
      base = self.base * ((self.scaling_factor * seq_len / self.max_position_embeddings) -
                          (self.scaling_factor - 1))**(self.dim / (self.dim - 2))
      inv_freq = 1.0 / (base**(torch.arange(0, self.dim, 2).float() / self.dim))
      self.register_buffer("inv_freq", inv_freq, persistent=False)
    t = torch.arange(self.max_seq_len_cached).to(dtype=self.inv_freq.dtype)
    if self.kind == "linear":
      t = t / self.scaling_factor
    freqs = torch.einsum("i,j->ij", t, self.inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    self.register_buffer("cos_cached", emb.cos().to(dtype), persistent=False)
    self.register_buffer("sin_cached", emb.sin().to(dtype), persistent=False)

  def forward(self, x, seq_len):
    if seq_len > self.max_seq_len_cached:
      self._set_cos_sin_cache(seq_len, torch.float32)
    return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


def rotate_half(x):
  x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
  return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
  cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
  return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):

  def __init__(self, config: InternLM2Config):
    super().__init__()
    self.num_heads = config.num_attention_heads
    self.head_dim = config.hidden_size // self.num_heads
    self.num_key_value_heads = config.num_key_value_heads
    self.num_key_value_groups = self.num_heads // self.num_key_value_heads
    self.wqkv = nn.Linear(config.hidden_size,
                          (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=False)
    self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
    self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling)

  def forward(self, hidden_states, attention_mask, position_ids, past_key_value):
    bsz, q_len, _ = hidden_states.shape
    # 'b q (h gs d) -> b q h gs d': key/value group outermost, then G query slots, key, value.
    qkv = self.wqkv(hidden_states).view(bsz, q_len, self.num_key_value_heads,
                                        self.num_key_value_groups + 2, self.head_dim)
    query_states = qkv[..., :self.num_key_value_groups, :].reshape(bsz, q_len, -1, self.head_dim)
    query_states = query_states.transpose(1, 2)
    key_states = qkv[..., -2, :].transpose(1, 2)
    value_states = qkv[..., -1, :].transpose(1, 2)

    kv_seq_len = key_states.shape[-2]
    if past_key_value is not None:
      kv_seq_len += past_key_value[0].shape[-2]
    cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
    if past_key_value is not None:
      key_states = torch.cat([past_key_value[0], key_states], dim=2)
      value_states = torch.cat([past_key_value[1], value_states], dim=2)
    past_key_value = (key_states, value_states)

    key_states = key_states.repeat_interleave(self.num_key_value_groups, dim=1)
    value_states = value_states.repeat_interleave(self.num_key_value_groups, dim=1)
    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
    attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32)
    attn_output = torch.matmul(attn_weights.to(query_states.dtype), value_states)
    attn_output = attn_output.transpose(1, 2).reshape(bsz, q_len, -1)
    return self.wo(attn_output), past_key_value


class FeedForward(nn.Module):

  def __init__(self, config: InternLM2Config):
    super().__init__()
    self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x):
    return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):

  def __init__(self, config: InternLM2Config):
    super().__init__()
    self.attention = Attention(config)
    self.feed_forward = FeedForward(config)
    self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

  def forward(self, hidden_states, attention_mask, position_ids, past_key_value):
    attended, past_key_value = self.attention(self.attention_norm(hidden_states), attention_mask,
                                              position_ids, past_key_value)
    hidden_states = hidden_states + attended
    hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
    return hidden_states, past_key_value


class Model(nn.Module):

  def __init__(self, config: InternLM2Config):
    super().__init__()
    self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
  """`forward(input_ids, attention_mask, position_ids=None, past_key_values=None)`, where
  `attention_mask` (batch, past + length) marks the real tokens as the official model's does, and
  position ids default to past .. past + length - 1 as there."""

  def __init__(self, config: InternLM2Config):
    super().__init__()
    self.model = Model(config)
    self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

  def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None):
    batch, length = input_ids.shape
    past = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
    if position_ids is None:
      position_ids = torch.arange(past, past + length)[None].expand(batch, length)
    causal = torch.ones(length, past + length, dtype=torch.bool).tril(past)
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    hidden_states = self.model.tok_embeddings(input_ids)
    caches = []
    for i, layer in enumerate(self.model.layers):
      hidden_states, cache = layer(hidden_states, mask, position_ids,
                                   None if past_key_values is None else past_key_values[i])
      caches.append(cache)
    return self.output(self.model.norm(hidden_states)).float(), tuple(caches)
