"""LLaMA: parity with transformers, KV-cache decoding, conversion, sizes, logical axes, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from internvl_jax.config import RopeScaling, llama_preset
from internvl_jax.convert import keymap, llama_layouts
from internvl_jax.convert.safetensors_io import SafetensorsFile
from internvl_jax.models import llama
from llama_fixtures import (GQA, LAYOUT, MHA, export_transformers, import_tensors,
                            import_transformers, random_params)

# Right-padded batch: rows of 7 and 4 real tokens (pad id 0), as transformers' tokenizers pad.
TOKENS = np.array([[1, 17, 30, 99, 4, 8, 64], [1, 120, 3, 77, 0, 0, 0]], np.int32)
MASK = TOKENS != 0


@pytest.fixture(scope="module", params=[MHA, GQA], ids=["mha", "gqa-tied"])
def model(request, tmp_path_factory):
  """(config, params, the transformers model loaded from the exported directory, the directory)."""
  config = request.param
  params = random_params(config)
  directory = tmp_path_factory.mktemp("llama")
  export_transformers(config, params, directory)
  reference, info = transformers.LlamaForCausalLM.from_pretrained(
      str(directory), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  return config, params, reference.eval(), directory


@pytest.fixture(scope="module")
def forward():
  return jax.jit(lambda config, params, tokens, mask, cache: llama.Llama(config).apply(
      {"params": params}, tokens, mask, cache=cache), static_argnums=0)


def test_matches_transformers_on_real_positions(model, forward):
  config, params, reference, _ = model
  with torch.no_grad():
    theirs = reference(input_ids=torch.from_numpy(TOKENS).long(),
                       attention_mask=torch.from_numpy(MASK).long()).logits.numpy()
  ours = forward(config, params, TOKENS, MASK, None)
  assert ours.logits.shape == (2, 7, config.vocab_size) and ours.logits.dtype == jnp.float32
  np.testing.assert_allclose(ours.logits[MASK], theirs[MASK], atol=1e-5, rtol=1e-5)


def test_cache_decoding_equals_the_full_forward_pass(model, forward):
  config, params, _, _ = model
  full = forward(config, params, TOKENS, MASK, None).logits
  # A 3-token prefill, then one token per call (the padding goes in with mask 0, as in a batch).
  out = forward(config, params, TOKENS[:, :3], MASK[:, :3], llama.init_cache(config, 2, 8))
  steps = [out.logits]
  for t in range(3, 7):
    out = forward(config, params, TOKENS[:, t:t + 1], MASK[:, t:t + 1], out.cache)
    steps.append(out.logits)
  assert int(out.cache.index) == 7
  np.testing.assert_array_equal(out.cache.valid[:, :7], MASK)
  np.testing.assert_allclose(np.concatenate(steps, axis=1)[MASK], full[MASK], atol=1e-5, rtol=1e-5)


def test_a_step_after_a_padded_prompt_continues_each_row(model, forward):
  config, params, _, _ = model
  # Row 1's next token goes in slot 7 but is its 5th token: it must see position 4 and no padding.
  prefill = forward(config, params, TOKENS, MASK, llama.init_cache(config, 2, 8))
  step = forward(config, params, np.array([[5], [5]], np.int32), MASK[:, :1], prefill.cache)
  extended = np.where(np.arange(7) == 4, 5, TOKENS)
  full = forward(config, params, extended, extended != 0, None)
  np.testing.assert_allclose(step.logits[1, 0], full.logits[1, 4], atol=1e-5, rtol=1e-5)


def test_a_packed_row_equals_its_samples_run_one_per_row(model, forward):
  config, params, _, _ = model
  # Row 0's first four tokens and row 1's real ones packed into one row, then padding.
  packed = np.concatenate([TOKENS[0, :4], TOKENS[1, :4], [0, 0]])[None]
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32)
  ours = forward(config, params, packed, segments, None).logits[0]
  alone = forward(config, params, TOKENS[:, :4], MASK[:, :4], None).logits
  np.testing.assert_allclose(ours[:8], alone.reshape(8, -1), atol=1e-5, rtol=1e-5)


def test_segment_positions_restart_per_sample_and_keep_left_and_right_padding():
  segments = np.array([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], np.int32)
  np.testing.assert_array_equal(llama.segment_positions(jnp.asarray(segments)),
                                [[0, 1, 2, 0, 1, 1], [0, 0, 0, 1, 2, 3], [0, 1, 1, 1, 1, 1]])


def test_transformers_layout_round_trip_is_bit_exact(model):
  config, params, _, directory = model
  loaded_config, loaded = import_transformers(directory)
  assert loaded_config == config
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_tied_embeddings_write_no_lm_head():
  shapes = lambda config: {t.key: t.torch_shape for t in keymap.plan(LAYOUT, llama.abstract_params(config))}
  tied, untied = shapes(GQA), shapes(MHA)
  assert set(untied) - set(tied) == {"lm_head.weight"} and untied["lm_head.weight"] == (128, 64)
  assert tied["model.layers.2.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads x 16
  assert tied["model.layers.2.self_attn.o_proj.weight"] == (64, 64)


class _DictSource:
  def __init__(self, tensors):
    self.tensors = tensors
    self.keys = tensors.keys
    self.shape = lambda key: tensors[key].shape
    self.dtype = lambda key: tensors[key].dtype

  def read(self, key, rows=slice(None)):
    return self.tensors[key][rows]


def test_reads_checkpoints_with_rotary_buffers_and_tied_copies(tmp_path):
  params = random_params(GQA)
  export_transformers(GQA, params, tmp_path)
  reader = SafetensorsFile(str(tmp_path / "model.safetensors"))
  tensors = {key: reader.read(key) for key in reader.keys()}
  tensors.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
                  "lm_head.weight": tensors["model.embed_tokens.weight"]})
  jax.tree.map(np.testing.assert_array_equal, import_tensors(GQA, _DictSource(tensors)), params)
  tensors["model.layers.0.mlp.gate_proj.bias"] = np.zeros(160, np.float32)
  with pytest.raises(keymap.ConversionError, match="unexpected keys .*: model.layers.0.mlp.gate_proj.bias"):
    import_tensors(GQA, _DictSource(tensors))


def test_config_json_round_trip_and_bad_fields():
  assert llama_layouts.config_from_json(llama_layouts.config_json(GQA)) == GQA
  for preset in ("llama-7b", "vicuna-13b"):
    config = llama_preset(preset)
    assert llama_layouts.config_from_json(llama_layouts.config_json(config)) == config
  older = {k: v for k, v in llama_layouts.config_json(MHA).items() if k != "rope_parameters"}
  assert llama_layouts.config_from_json(older) == MHA
  for scaling in (RopeScaling("linear", 2.0), RopeScaling("dynamic", 3.0, MHA.max_positions)):
    scaled = MHA.replace(rope_scaling=scaling)
    assert llama_layouts.config_from_json(llama_layouts.config_json(scaled)) == scaled
  # InternVL3's llm_config spelling (chat spec 2.3): only the older field, no theta in it.
  older_dynamic = older | {"rope_scaling": {"type": "dynamic", "factor": 2.0}}
  assert llama_layouts.config_from_json(older_dynamic).rope_scaling == RopeScaling(
      "dynamic", 2.0, MHA.max_positions)
  scaled = llama_layouts.config_json(MHA) | {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
  with pytest.raises(ValueError, match="RoPE scaling .* is not supported"):
    llama_layouts.config_from_json(scaled)
  internlm2_dynamic = RopeScaling("dynamic", 2.0, MHA.max_positions, length="keys")
  with pytest.raises(ValueError, match="has no transformers LLaMA / Qwen2 equivalent"):
    llama_layouts.config_json(MHA.replace(rope_scaling=internlm2_dynamic))
  with pytest.raises(ValueError, match="with q/k/v biases has no LlamaForCausalLM .* use the 'qwen2'"):
    llama_layouts.config_json(MHA.replace(qkv_bias=True))
  with pytest.raises(ValueError, match="lacks the field 'vocab_size'"):
    llama_layouts.config_from_json({"hidden_size": 64, "num_attention_heads": 4})


@pytest.mark.parametrize("preset, expected", [
    ("llama-7b", 6_885_494_784),  # InternVL's multilingual LLaMA-7B, vocab 49954, untied
    ("vicuna-7b", 6_738_415_616),
    ("vicuna-13b", 13_015_864_320),
])
def test_parameter_counts_match_transformers(preset, expected):
  config = llama_preset(preset)
  shapes = llama.abstract_params(config)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
  with torch.device("meta"):
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **llama_layouts.config_json(config)))
  assert sum(p.numel() for p in reference.parameters()) == expected


def test_every_param_names_its_logical_axes():
  variables = jax.eval_shape(llama.Llama(GQA.replace(tie_embeddings=False)).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 4), jnp.int32))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(variables)["params"]
  P = jax.sharding.PartitionSpec
  assert specs["embed_tokens"]["embedding"] == P("vocab", "embed")
  assert specs["lm_head"]["kernel"] == P("embed", "vocab")
  attn = specs["layers"]["self_attn"]
  assert attn["q_proj"]["kernel"] == P("layers", "embed", "heads", "head_dim")
  assert attn["k_proj"]["kernel"] == P("layers", "embed", "kv_heads", "head_dim")
  assert attn["o_proj"]["kernel"] == P("layers", "heads", "head_dim", "embed")
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P("layers", "mlp", "embed")
  assert specs["layers"]["input_layernorm"]["scale"] == P("layers", "norm")


def test_remat_keeps_the_gradients_and_bfloat16_the_logits(forward):
  params = random_params(MHA)
  loss = lambda config: lambda p: jnp.sum(llama.Llama(config).apply({"params": p}, TOKENS, MASK).logits**2)
  reference, rematerialized = (jax.jit(jax.grad(loss(c)))(params)
                               for c in (MHA, MHA.replace(remat_policy="offload_dot_except_mlp")))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), reference,
               rematerialized)
  high = forward(MHA, params, TOKENS, MASK, None)
  low = forward(MHA.replace(dtype="bfloat16"), params, TOKENS, MASK, None)
  assert low.hidden_state.dtype == jnp.bfloat16 and low.logits.dtype == jnp.float32
  assert np.abs(low.logits - high.logits).mean() < 0.05 * np.abs(high.logits).mean()


def test_bad_input_and_configs_give_clear_errors():
  params = {}  # the checks come before any param is used
  with pytest.raises(ValueError, match="integer ids of shape \\(batch, length\\)"):
    llama.Llama(MHA).apply({"params": params}, TOKENS[0])
  with pytest.raises(ValueError, match="attention_mask has shape"):
    llama.Llama(MHA).apply({"params": params}, TOKENS, MASK[:, :3])
  with pytest.raises(ValueError, match="Unknown LLaMA preset"):
    llama_preset("llama-65b")
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
    llama_preset("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="eos_id=200 is outside the vocabulary"):
    llama_preset("tiny", eos_id=200)
