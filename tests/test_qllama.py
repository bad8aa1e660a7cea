"""QLLaMA: who sees whom in each mode, where cross-attention acts, parity with a PyTorch
transcription of the reference's forward, and the text mode as the plain LLaMA text tower."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from internvl_jax.config import QLlamaConfig, llama_preset
from internvl_jax.models import attention, llama, qllama
from llama_fixtures import export_transformers

# Four layers in two blocks: cross-attention in layers 0 and 2. The vision width differs from
# the text width so that a mixed-up projection cannot go unnoticed.
CONFIG = QLlamaConfig(text=llama_preset("tiny", num_layers=4), vision_width=48, num_queries=4)
Q = CONFIG.num_queries
# Right-padded rows of 5 and 3 real tokens (pad id 0).
TOKENS = np.array([[1, 17, 30, 99, 4, 0], [1, 120, 3, 0, 0, 0]], np.int32)
MASK = TOKENS != 0
VISION = np.random.default_rng(1).normal(size=(2, 5, 48)).astype(np.float32)


def _random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  params = qllama.init_params(config, seed=seed)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


PARAMS = _random_params(CONFIG)


def run(mode, params=PARAMS, tokens=TOKENS, vision=VISION, mask=MASK, config=CONFIG):
  """The mode's (queries, text) outputs as numpy (None where the mode has none)."""
  text_inputs = (None, None) if mode == "image" else (tokens, mask)
  out = _apply(config, mode, params, *text_inputs, None if mode == "text" else vision)
  return tuple(None if x is None else np.asarray(x) for x in (out.queries, out.text))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(config, mode, params, tokens, mask, vision):
  return qllama.QLlama(config).apply({"params": params}, tokens, mask, vision, mode=mode)


def _changed(before, after):
  """Per position: did any feature change at all."""
  return np.any(before != after, axis=-1)


def _perturbed_token(row, position):
  tokens = TOKENS.copy()
  tokens[row, position] = (tokens[row, position] + 7) % CONFIG.text.vocab_size
  return tokens


def _perturbed_query(index):
  params = jax.tree.map(lambda x: x, PARAMS)
  params["query_tokens"] = PARAMS["query_tokens"].copy()
  params["query_tokens"][0, index] += 1.0
  return params


def _text_changes(mode, **perturbation):
  """(changed query positions (batch, Q) or None, changed real text positions as lists per row)."""
  (queries, text), (new_queries, new_text) = run(mode), run(mode, **perturbation)
  query_changes = None if queries is None else _changed(queries, new_queries)
  text_changes = None if text is None else [
      _changed(text, new_text)[row, MASK[row]].tolist() for row in range(len(TOKENS))]
  return query_changes, text_changes


ALL, NONE = np.ones((2, Q), bool), np.zeros((2, Q), bool)
ROW0_ONLY = np.array([[True] * Q, [False] * Q])


def test_itc_queries_and_text_do_not_see_each_other():
  queries, text = _text_changes("itc", tokens=_perturbed_token(0, 2))
  np.testing.assert_array_equal(queries, NONE)
  assert text == [[False, False, True, True, True], [False] * 3]  # causal
  queries, text = _text_changes("itc", params=_perturbed_query(1))
  np.testing.assert_array_equal(queries, ALL)
  assert text == [[False] * 5, [False] * 3]
  queries, text = _text_changes("itc", vision=VISION + 1.0)
  np.testing.assert_array_equal(queries, ALL)
  assert text == [[False] * 5, [False] * 3]


def test_itm_is_bidirectional_over_queries_and_text():
  queries, text = _text_changes("itm", tokens=_perturbed_token(0, 3))
  np.testing.assert_array_equal(queries, ROW0_ONLY)
  assert text == [[True] * 5, [False] * 3]  # earlier text sees later text
  queries, text = _text_changes("itm", params=_perturbed_query(1))
  np.testing.assert_array_equal(queries, ALL)
  assert text == [[True] * 5, [True] * 3]
  _, text = _text_changes("itm", vision=VISION + 1.0)
  assert text == [[True] * 5, [True] * 3]


def test_itg_text_sees_queries_and_earlier_text_only():
  queries, text = _text_changes("itg", tokens=_perturbed_token(1, 1))
  np.testing.assert_array_equal(queries, NONE)
  assert text == [[False] * 5, [False, True, True]]
  queries, text = _text_changes("itg", params=_perturbed_query(3))
  np.testing.assert_array_equal(queries, ALL)  # queries see each other both ways
  assert text == [[True] * 5, [True] * 3]
  _, text = _text_changes("itg", vision=VISION + 1.0)
  assert text == [[True] * 5, [True] * 3]


def test_image_mode_has_no_text_and_full_query_attention():
  queries, text = run("image")
  assert queries.shape == (2, Q, 64) and text is None
  np.testing.assert_array_equal(_changed(queries, run("image", params=_perturbed_query(3))[0]), ALL)
  vision = VISION.copy()
  vision[1] += 1.0
  np.testing.assert_array_equal(_changed(queries, run("image", vision=vision)[0]), ~ROW0_ONLY)
  # Image mode is the ITC queries: the text there is invisible to them.
  np.testing.assert_allclose(queries, run("itc")[0], atol=1e-5, rtol=1e-5)


def test_text_mode_has_no_queries_and_ignores_them():
  queries, text = run("text")
  assert queries is None and text.shape == (2, 6, 64)
  assert run("text", params=_perturbed_query(0))[1].tobytes() == text.tobytes()
  _, changes = _text_changes("text", tokens=_perturbed_token(0, 2))
  assert changes == [[False, False, True, True, True], [False] * 3]


@pytest.mark.parametrize("mode", ["text", "itc", "itm", "itg"])
def test_padding_is_invisible(mode):
  tokens = TOKENS.copy()
  tokens[:, -1] = 5  # pad slots of both rows, still masked out
  (queries, text), (new_queries, new_text) = run(mode), run(mode, tokens=tokens)
  if queries is not None:
    np.testing.assert_array_equal(queries, new_queries)
  np.testing.assert_array_equal(text[MASK], new_text[MASK])


def test_masks_and_positions_per_mode():
  text_mask = jnp.asarray([[True, True, False]])
  dense = lambda mask, length: np.asarray(attention.dense_mask(mask, length, length))[0, 0]
  # The last row is a padding query, which no output uses.
  for mode, visible in {
      "itc": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [1, 1, 1, 1, 0]],
      "itm": [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],
      "itg": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],
  }.items():
    mask, positions = qllama.attention_mask_and_positions(mode, text_mask, num_queries=2)
    np.testing.assert_array_equal(dense(mask, 5), np.asarray(visible, bool), err_msg=mode)
    np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 3]])
  mask, positions = qllama.attention_mask_and_positions("text", text_mask, num_queries=2)
  np.testing.assert_array_equal(dense(mask, 3), [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
  np.testing.assert_array_equal(positions, [[0, 1, 1]])
  mask, positions = qllama.attention_mask_and_positions("image", jnp.ones((1, 0), bool), 2)
  assert bool(dense(mask, 2).all())
  np.testing.assert_array_equal(positions, [[0, 1]])


def test_cross_attention_only_in_layers_0_f_2f():
  layers = PARAMS["layers"]
  assert set(layers) == {"layer_0", "layer_1"}
  assert "cross_attn" in layers["layer_0"] and "cross_attn" not in layers["layer_1"]
  cross = layers["layer_0"]["cross_attn"]
  assert cross["q_proj"]["kernel"].shape == (2, 64, 4, 16)  # 2 blocks: layers 0 and 2
  assert cross["k_proj"]["kernel"].shape == (2, 48, 4, 16)  # from the vision width
  assert cross["norm2"]["scale"].shape == (2, 48) and cross["norm1"]["scale"].shape == (2, 64)
  assert "bias" not in cross["q_proj"]
  # The vision tokens reach the outputs only through those blocks' cross-attention.
  silenced = jax.tree.map(lambda x: x, PARAMS)
  silenced["layers"]["layer_0"]["cross_attn"]["o_proj"]["kernel"] = np.zeros_like(
      cross["o_proj"]["kernel"])
  queries, text = run("itg", params=silenced)
  new_queries, new_text = run("itg", params=silenced, vision=VISION + 1.0)
  np.testing.assert_array_equal(queries, new_queries)
  np.testing.assert_array_equal(text, new_text)
  # A frequency of 3: blocks of three layers, the first with cross-attention.
  every_third = qllama.abstract_params(CONFIG.replace(
      text=CONFIG.text.replace(num_layers=6), cross_attention_frequency=3))["layers"]
  assert set(every_third) == {"layer_0", "layer_1", "layer_2"}
  assert [("cross_attn" in every_third[f"layer_{j}"]) for j in range(3)] == [True, False, False]
  assert every_third["layer_2"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 160)


def test_text_mode_is_the_llama_text_tower_and_itc_text_equals_it():
  llama_params = qllama.llama_params(PARAMS, CONFIG)
  plain = jax.jit(llama.Llama(CONFIG.text).apply)({"params": llama_params}, TOKENS, MASK)
  _, text = run("text")
  np.testing.assert_allclose(text, plain.hidden_state, atol=1e-6, rtol=1e-6)
  # RoPE is relative: the ITC text, shifted behind the (invisible) queries, is the same.
  np.testing.assert_allclose(run("itc")[1][MASK], text[MASK], atol=1e-5, rtol=1e-5)
  # The LLaMA weights move between the two layouts without loss.
  rebuilt = qllama.with_llama_params(_random_params(CONFIG, seed=1), llama_params, CONFIG)
  rebuilt["query_tokens"] = PARAMS["query_tokens"]
  rebuilt["layers"]["layer_0"]["cross_attn"] = PARAMS["layers"]["layer_0"]["cross_attn"]
  jax.tree.map(np.testing.assert_array_equal, rebuilt, PARAMS)


def _torch_qllama(model, params, tokens, mask, vision, config):
  """The reference's forward_train with transformers' LLaMA layers and a transcription of its
  LlamaCrossAttention: after self-attention, before the MLP, on the first Q positions only."""
  cfg, f = config.text, config.cross_attention_frequency
  rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
  heads = lambda x: x.reshape(x.shape[0], x.shape[1], cfg.num_heads, -1).transpose(1, 2)

  def cross_attention(x, p):
    kernel = lambda name: torch.from_numpy(np.asarray(p[f"{name}_proj"]["kernel"]))
    q = heads(rms(x, torch.from_numpy(p["norm1"]["scale"])) @ kernel("q").flatten(1))
    v_in = rms(vision, torch.from_numpy(p["norm2"]["scale"]))
    k, v = heads(v_in @ kernel("k").flatten(1)), heads(v_in @ kernel("v").flatten(1))
    weights = ((q @ k.transpose(-1, -2)) * cfg.head_dim**-0.5).softmax(-1)
    out = (weights @ v).transpose(1, 2).flatten(2)
    return out @ kernel("o").flatten(0, 1)

  with torch.no_grad():
    queries = torch.from_numpy(params["query_tokens"]).expand(len(tokens), -1, -1)
    h = torch.cat([queries, model.model.embed_tokens(torch.from_numpy(tokens).long())], 1)
    rope = model.model.rotary_emb(h, torch.arange(h.shape[1])[None])
    additive = torch.where(torch.from_numpy(mask.copy()), 0.0, torch.finfo(torch.float32).min)
    for i, layer in enumerate(model.model.layers):
      h = h + layer.self_attn(layer.input_layernorm(h), rope, additive)[0]
      if i % f == 0:
        p = jax.tree.map(lambda x: x[i // f], params["layers"]["layer_0"]["cross_attn"])
        h = torch.cat([h[:, :Q] + cross_attention(h[:, :Q], p), h[:, Q:]], 1)
      h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h).numpy()


@pytest.mark.parametrize("mode", ["itm", "itg"])
def test_matches_a_pytorch_transcription_of_the_reference(tmp_path, mode):
  export_transformers(CONFIG.text, qllama.llama_params(PARAMS, CONFIG), tmp_path)
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
  mask, _ = qllama.attention_mask_and_positions(mode, jnp.asarray(MASK), Q)
  length = Q + MASK.shape[1]
  theirs = _torch_qllama(model.eval(), PARAMS, TOKENS, np.asarray(
      attention.dense_mask(mask, length, length)), torch.from_numpy(VISION),
                         CONFIG)
  queries, text = run(mode)
  np.testing.assert_allclose(queries, theirs[:, :Q], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(text[MASK], theirs[:, Q:][MASK], atol=1e-5, rtol=1e-5)
  logits = qllama.QLlama(CONFIG).apply({"params": PARAMS}, jnp.asarray(text),
                                       method=qllama.QLlama.logits)
  with torch.no_grad():
    their_logits = model.lm_head(torch.from_numpy(theirs[:, Q:])).numpy()
  np.testing.assert_allclose(np.asarray(logits)[MASK], their_logits[MASK], atol=1e-4, rtol=1e-5)


def test_three_modes_in_one_pass_equal_three_passes():
  tokens, mask = np.concatenate([TOKENS] * 3), np.concatenate([MASK] * 3)
  joint = _apply(CONFIG, ("itm", "itc", "itg"), PARAMS, tokens, mask, VISION)  # vision repeats
  for chunk, mode in enumerate(("itm", "itc", "itg")):
    queries, text = run(mode)
    rows = slice(2 * chunk, 2 * chunk + 2)
    np.testing.assert_allclose(joint.queries[rows], queries, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(joint.text[rows])[MASK], text[MASK], atol=1e-5, rtol=1e-5)


def test_bad_inputs_give_clear_errors():
  model = qllama.QLlama(CONFIG)
  apply = lambda *args, **kwargs: model.apply({"params": PARAMS}, *args, **kwargs)
  with pytest.raises(ValueError, match="Unknown QLLaMA mode 'itx'"):
    apply(TOKENS, MASK, VISION, mode="itx")
  with pytest.raises(ValueError, match="'text' mode takes no vision"):
    apply(TOKENS, MASK, VISION, mode="text")
  with pytest.raises(ValueError, match="'image' mode takes no tokens"):
    apply(TOKENS, MASK, VISION, mode="image")
  with pytest.raises(ValueError, match="'itc' mode takes vision"):
    apply(TOKENS, MASK, None, mode="itc")
  with pytest.raises(ValueError, match=r"vision features must be \(batch, tokens, 48\)"):
    apply(TOKENS, MASK, VISION[..., :32], mode="itc")
  with pytest.raises(ValueError, match="not a multiple of the vision batch"):
    apply(TOKENS, MASK, np.concatenate([VISION] * 2)[:3], mode="itc")
  with pytest.raises(ValueError, match="Only the modes with queries and text"):
    apply(TOKENS, MASK, VISION, mode=("text", "itc"))
  with pytest.raises(ValueError, match=r"with a slot axis .* take 'itg' rows of one batch"):
    apply(TOKENS, MASK, VISION[:, None], mode="itm")
  with pytest.raises(ValueError, match="must be positive and divide num_layers 4"):
    CONFIG.replace(cross_attention_frequency=3)


def test_every_param_names_its_logical_axes():
  variables = jax.eval_shape(
      lambda t, v: qllama.QLlama(CONFIG).init(
          jax.random.key(0), t, v, method=lambda m, t, v: m.logits(m(t, None, v, mode="itg").text)),
      jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1, 1, 48), jnp.float32))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(variables)["params"]
  P = jax.sharding.PartitionSpec
  assert specs["query_tokens"] == P(None, None, "embed")
  cross = specs["layers"]["layer_0"]["cross_attn"]
  assert cross["k_proj"]["kernel"] == P("layers", "embed", "kv_heads", "head_dim")
  assert cross["o_proj"]["kernel"] == P("layers", "heads", "head_dim", "embed")
  assert cross["norm2"]["scale"] == P("layers", "norm")
  assert specs["layers"]["layer_1"]["mlp"]["up_proj"]["kernel"] == P("layers", "embed", "mlp")


def test_remat_keeps_the_gradients_and_bfloat16_the_outputs():
  def loss(config):
    def fn(params):
      out = qllama.QLlama(config).apply({"params": params}, TOKENS, MASK, VISION, mode="itg")
      return jnp.sum(out.queries.astype(jnp.float32)**2) + jnp.sum(out.text.astype(jnp.float32)**2)
    return fn
  remat = CONFIG.replace(text=CONFIG.text.replace(remat_policy="save_dot_with_context_except_mlp"))
  reference, rematerialized = (jax.jit(jax.grad(loss(c)))(PARAMS) for c in (CONFIG, remat))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), reference,
               rematerialized)
  low = CONFIG.replace(text=CONFIG.text.replace(dtype="bfloat16"))
  high_text, low_text = run("itg")[1], run("itg", config=low)[1]
  assert _apply(low, "itg", PARAMS, TOKENS, MASK, VISION).text.dtype == jnp.bfloat16
  assert np.abs(low_text - high_text).mean() < 0.05 * np.abs(high_text).mean()
