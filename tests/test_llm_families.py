"""The chat LLM families (chat spec 2) as configurations of the one decoder, against references.

LLaMA / Yi, Qwen2 and Phi-3 are checked against transformers' own classes, InternLM2 against
`internlm2_reference.py` (written from the official modeling code), all in float32 to 1e-5 on
tiny random models whose `max_positions` is 32, so that 36-40 token prompts pass the RoPE
scaling threshold: logits of right-padded batches below and above it, and greedy decoding over
the KV cache that crosses it.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from internvl_jax import generate
from internvl_jax.config import LlamaConfig, RopeScaling
from internvl_jax.convert import llama_layouts
from internvl_jax.convert.pytorch import export_pytorch, import_pytorch
from internvl_jax.models import llama
import internlm2_reference
from llama_fixtures import random_params

TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
            max_positions=32)
HEAD_DIM = 16
_rng = np.random.default_rng(7)
# Phi-3's per-frequency divisors, in its range (1 to a few tens for the long ones).
SHORT_FACTOR = tuple(np.round(1 + _rng.random(HEAD_DIM // 2), 3).tolist())
LONG_FACTOR = tuple(np.round(1 + 20 * _rng.random(HEAD_DIM // 2), 3).tolist())

FAMILIES = {
    # Yi-34B / LLaMA-3-70B: grouped-query heads, a large rope theta, no scaling (spec 2.4).
    "llama": LlamaConfig(**TINY, rope_base=5e6, norm_eps=1e-5),
    # Qwen2-0.5B / InternVL3-1B: q/k/v biases, tied head, transformers' dynamic NTK.
    "qwen2-tied-dynamic": LlamaConfig(
        **TINY, rope_base=1e4, qkv_bias=True, tie_embeddings=True,
        rope_scaling=RopeScaling("dynamic", 2.0, original_max_positions=32)),
    "qwen2-untied": LlamaConfig(**TINY, rope_base=1e6, qkv_bias=True),
    # Phi-3-mini-128k: "su" / longrope, 32 original positions stretched to 128 (factor 4).
    "phi3-longrope": LlamaConfig(
        **dict(TINY, max_positions=128), norm_eps=1e-5,
        rope_scaling=RopeScaling("longrope", 4.0, original_max_positions=32,
                                 short_factor=SHORT_FACTOR, long_factor=LONG_FACTOR)),
    # InternLM2 / 2.5: dynamic NTK keyed on the key length, and the linear variant.
    "internlm2-dynamic": LlamaConfig(
        **TINY, rope_base=1e4, norm_eps=1e-5,
        rope_scaling=RopeScaling("dynamic", 2.5, original_max_positions=32, length="keys")),
    "internlm2-linear": LlamaConfig(**TINY, rope_base=1e4, norm_eps=1e-5,
                                    rope_scaling=RopeScaling("linear", 3.0)),
}


def _linear(kernel, inputs=1):
  """A Flax kernel (inputs..., outputs...) as a torch Linear weight (outputs, inputs)."""
  kernel = np.asarray(kernel)
  rows = int(np.prod(kernel.shape[:inputs]))
  return torch.from_numpy(kernel.reshape(rows, -1).T.copy())


def _layer(params, i):
  return {"attn": {k: {n: w[i] for n, w in v.items()} for k, v in params["layers"]["self_attn"].items()},
          "mlp": {k: v["kernel"][i] for k, v in params["layers"]["mlp"].items()},
          "norm1": params["layers"]["input_layernorm"]["scale"][i],
          "norm2": params["layers"]["post_attention_layernorm"]["scale"][i]}


def transformers_state(config, params, fused):
  """Our params as the state dict of transformers' Llama / Qwen2 (fused=False) or Phi3 (True)."""
  tensor = lambda a: torch.from_numpy(np.array(a))
  embedding = tensor(params["embed_tokens"]["embedding"])
  state = {"model.embed_tokens.weight": embedding, "model.norm.weight": tensor(params["norm"]["scale"]),
           "lm_head.weight": embedding if config.tie_embeddings else _linear(params["lm_head"]["kernel"])}
  for i in range(config.num_layers):
    layer, prefix = _layer(params, i), f"model.layers.{i}."
    attn, mlp = layer["attn"], layer["mlp"]
    q, k, v = (_linear(attn[f"{n}_proj"]["kernel"]) for n in "qkv")
    state[prefix + "self_attn.o_proj.weight"] = _linear(attn["o_proj"]["kernel"], inputs=2)
    if fused:  # Phi-3: rows [q | k | v] and [gate | up] (spec 2.2)
      state[prefix + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
      state[prefix + "mlp.gate_up_proj.weight"] = torch.cat(
          [_linear(mlp["gate_proj"]), _linear(mlp["up_proj"])])
    else:
      state.update({prefix + f"self_attn.{n}_proj.weight": w for n, w in zip("qkv", (q, k, v))})
      state.update({prefix + f"mlp.{n}_proj.weight": _linear(mlp[f"{n}_proj"]) for n in ("gate", "up")})
    if config.qkv_bias:
      state.update({prefix + f"self_attn.{n}_proj.bias": tensor(attn[f"{n}_proj"]["bias"]).reshape(-1)
                    for n in "qkv"})
    state[prefix + "mlp.down_proj.weight"] = _linear(mlp["down_proj"])
    state[prefix + "input_layernorm.weight"] = tensor(layer["norm1"])
    state[prefix + "post_attention_layernorm.weight"] = tensor(layer["norm2"])
  return state


def internlm2_state(config, params):
  """Our params in the official InternLM2 layout, `wqkv` rows as (kv_heads, groups + 2, head_dim)."""
  tensor = lambda a: torch.from_numpy(np.array(a))
  kv, groups = config.num_kv_heads, config.num_heads // config.num_kv_heads
  state = {"model.tok_embeddings.weight": tensor(params["embed_tokens"]["embedding"]),
           "model.norm.weight": tensor(params["norm"]["scale"]),
           "output.weight": _linear(params["lm_head"]["kernel"])}
  for i in range(config.num_layers):
    layer, prefix = _layer(params, i), f"model.layers.{i}."
    attn, mlp = layer["attn"], layer["mlp"]
    q, k, v = (_linear(attn[f"{n}_proj"]["kernel"]).reshape(kv, -1, HEAD_DIM, config.hidden_size)
               for n in "qkv")
    assert q.shape[1] == groups
    state[prefix + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, config.hidden_size)
    state[prefix + "attention.wo.weight"] = _linear(attn["o_proj"]["kernel"], inputs=2)
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
      state[prefix + f"feed_forward.{theirs}.weight"] = _linear(mlp[f"{ours}_proj"])
    state[prefix + "attention_norm.weight"] = tensor(layer["norm1"])
    state[prefix + "ffn_norm.weight"] = tensor(layer["norm2"])
  return state


def _rope_parameters(config):
  scaling, parameters = config.rope_scaling, {"rope_type": "default", "rope_theta": config.rope_base}
  if scaling is not None and scaling.kind == "longrope":
    parameters.update(rope_type="longrope", short_factor=list(scaling.short_factor),
                      long_factor=list(scaling.long_factor))
  elif scaling is not None:
    parameters.update(rope_type=scaling.kind, factor=scaling.factor)
  return parameters


def reference(family):
  """A fresh reference model (the dynamic RoPE classes keep state between calls)."""
  config = FAMILIES[family]
  params = random_params(config)
  if family.startswith("internlm2"):
    scaling = config.rope_scaling
    model = internlm2_reference.InternLM2ForCausalLM(internlm2_reference.InternLM2Config(
        config.vocab_size, config.hidden_size, config.mlp_dim, config.num_layers, config.num_heads,
        config.num_kv_heads, config.max_positions, config.rope_base,
        {"type": scaling.kind, "factor": scaling.factor}, config.norm_eps))
    model.load_state_dict(internlm2_state(config, params), strict=True)
    return model.eval()
  common = dict(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_positions,
      rms_norm_eps=config.norm_eps, rope_parameters=_rope_parameters(config),
      tie_word_embeddings=config.tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0,
      attn_implementation="eager")
  if family.startswith("phi3"):
    hf_config = transformers.Phi3Config(
        **common, original_max_position_embeddings=config.rope_scaling.original_max_positions)
    model = transformers.Phi3ForCausalLM(hf_config)
  elif family.startswith("qwen2"):
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=False))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  model.load_state_dict(transformers_state(config, params, fused=family.startswith("phi3")),
                        strict=True)
  return model.eval()


def reference_step(model, tokens, mask, positions, past):
  """(logits, cache) of one reference call; `mask` covers the cached and the new tokens."""
  args = (torch.from_numpy(np.asarray(tokens, np.int64)), torch.from_numpy(np.asarray(mask)).long(),
          torch.from_numpy(np.asarray(positions, np.int64)))
  with torch.no_grad():
    if isinstance(model, internlm2_reference.InternLM2ForCausalLM):
      logits, past = model(*args, past_key_values=past)
      return logits.numpy(), past
    if past is None:
      past = transformers.DynamicCache(config=model.config)
    out = model(input_ids=args[0], attention_mask=args[1], position_ids=args[2], cache=past,
                use_cache=True)
    return out.logits.numpy(), out.cache


def batch(lengths, width):
  """Right-padded random tokens (ids 3.., no EOS) with rows of the given real lengths, and the mask."""
  rng = np.random.default_rng(width)
  mask = np.arange(width)[None] < np.array(lengths)[:, None]
  return np.where(mask, rng.integers(3, 128, (len(lengths), width)), 0).astype(np.int32), mask


def mask_positions(mask):
  """transformers' generation positions: real tokens count 0, 1, ...; padding says 1."""
  return np.where(mask, np.cumsum(mask, axis=1) - 1, 1)


def left_padded(tokens, mask):
  """The right-padded rows moved to the right end (transformers generates from left padding)."""
  shift = mask.shape[1] - mask.sum(axis=1)
  return (np.stack([np.roll(row, s) for row, s in zip(tokens, shift)]),
          np.stack([np.roll(row, s) for row, s in zip(mask, shift)]))


def reference_greedy(family, tokens, mask, steps):
  """The reference's greedy tokens (EOS never chosen) and the logits that chose each, decoding one
  token per call over its own cache, with positions and mask as transformers' generate makes."""
  model = reference(family)
  tokens, mask = left_padded(tokens, mask)
  logits, past = reference_step(model, tokens, mask, mask_positions(mask), None)
  chosen, chosen_by = [], []
  for step in range(steps):
    last = logits[:, -1]
    token = np.argmax(np.where(np.arange(last.shape[-1]) == FAMILIES[family].eos_id, -np.inf, last),
                      axis=-1)
    chosen.append(token)
    chosen_by.append(last)
    if step + 1 < steps:
      mask = np.concatenate([mask, np.ones((len(token), 1), bool)], axis=1)
      logits, past = reference_step(model, token[:, None], mask, mask.sum(1, keepdims=True) - 1, past)
  return np.stack(chosen, axis=1), np.stack(chosen_by, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def forward(config, params, tokens, mask, cache=None):
  return llama.Llama(config).apply({"params": params}, tokens, mask, cache=cache)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths, width", [
    ((12, 7), 12),  # below the threshold
    ((40, 25), 40),  # above it
    ((30, 20), 36),  # real tokens below it, padded keys above it (InternLM2's dynamic scales)
], ids=["short", "long", "long-padding"])
def test_logits_match_the_reference(family, lengths, width):
  config = FAMILIES[family]
  tokens, mask = batch(lengths, width)
  theirs, _ = reference_step(reference(family), tokens, mask, mask_positions(mask), None)
  ours = forward(config, random_params(config), tokens, mask).logits
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2-tied-dynamic", "phi3-longrope",
                                    "internlm2-dynamic"])
def test_greedy_decoding_across_the_threshold_matches_the_reference(family):
  # Prompts of 28 and 20 tokens and 8 new ones: the longer row passes position 32 at step 5. Keys
  # already cached keep the rotation they were written with, on both sides. (transformers' Phi3
  # `generate` would instead drop its cache once at the crossing and rerun the prompt with the
  # long factors; InternVL's Phi-3 code and the model's own cached steps do not.)
  config, steps = FAMILIES[family], 8
  params = random_params(config)
  tokens, mask = batch((28, 20), 28)
  theirs, their_logits = reference_greedy(family, tokens, mask, steps)
  ours = generate.greedy_search(generate.LlamaDecoder(config), params, tokens, mask,
                                max_new_tokens=steps, min_new_tokens=steps, eos_id=config.eos_id,
                                pad_id=config.pad_id)
  np.testing.assert_array_equal(ours, theirs)

  out = forward(config, params, tokens, mask, llama.init_cache(config, 2, 28 + steps))
  our_logits = [out.logits[np.arange(2), mask.sum(axis=1) - 1]]
  for step in range(steps - 1):
    out = forward(config, params, theirs[:, step:step + 1], np.ones((2, 1), bool), out.cache)
    our_logits.append(out.logits[:, 0])
  np.testing.assert_allclose(np.stack(our_logits, axis=1), their_logits, atol=1e-5, rtol=1e-5)


def test_rope_scaling_lists_become_tuples_and_bad_fields_give_clear_errors():
  scaling = RopeScaling("longrope", 4.0, 32, short_factor=[1] * 8, long_factor=list(LONG_FACTOR))
  assert scaling.short_factor == (1.0,) * 8 and hash(FAMILIES["phi3-longrope"].replace(rope_scaling=scaling))
  with pytest.raises(ValueError, match="rope_scaling.kind='ntk' is not one of"):
    RopeScaling("ntk", 2.0)
  with pytest.raises(ValueError, match="rope_scaling.length='queries' is not one of"):
    RopeScaling("dynamic", 2.0, 32, length="queries")
  with pytest.raises(ValueError, match="linear factor 0.5 must be >= 1"):
    RopeScaling("linear", 0.5)
  with pytest.raises(ValueError, match="dynamic scaling needs original_max_positions"):
    RopeScaling("dynamic", 2.0)
  with pytest.raises(ValueError, match="short_factor and long_factor are needed for longrope"):
    RopeScaling("longrope", 4.0, 32, short_factor=SHORT_FACTOR)
  with pytest.raises(ValueError, match="short_factor and long_factor are only for longrope"):
    RopeScaling("dynamic", 2.0, 32, short_factor=SHORT_FACTOR, long_factor=LONG_FACTOR)
  with pytest.raises(ValueError, match="short_factor has 4 factors; head_dim 16 has 8 frequencies"):
    LlamaConfig(**TINY, rope_scaling=RopeScaling("longrope", 4.0, 32, short_factor=(1.0,) * 4,
                                                 long_factor=LONG_FACTOR))


@pytest.mark.parametrize("family", ["qwen2-tied-dynamic", "qwen2-untied"])
def test_qwen2_checkpoints_convert_both_ways(family, tmp_path):
  config = FAMILIES[family]
  params = random_params(config)
  export_pytorch(config, params, str(tmp_path), layout=llama_layouts.QWEN2)
  theirs, info = transformers.Qwen2ForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  tokens, mask = batch((40, 25), 40)
  logits, _ = reference_step(theirs.eval(), tokens, mask, mask_positions(mask), None)
  np.testing.assert_allclose(forward(config, params, tokens, mask).logits[mask], logits[mask],
                             atol=1e-5, rtol=1e-5)
  loaded_config, loaded = import_pytorch(str(tmp_path))
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
