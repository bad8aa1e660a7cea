"""Every attention implementation against the XLA reference, for every mask the models build.

cuDNN cannot run on CPU: its argument translation runs through `jax.nn.dot_product_attention`'s
own XLA path. Splash runs in Pallas interpret mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import sharding
from internvl_jax.config import AttentionConfig, internvl_preset
from internvl_jax.convert import formats
from internvl_jax.models import attention, internvl, llama, qllama

LENGTH, HEADS, HEAD_DIM = 12, 4, 8
SPLASH = AttentionConfig("splash", block_q=128, block_kv=128, block_kv_compute=128)


def _inputs(q_length=LENGTH, kv_length=LENGTH, kv_heads=HEADS, batch=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  shapes = [(batch, q_length, HEADS), (batch, kv_length, kv_heads), (batch, kv_length, kv_heads)]
  return [jax.random.normal(key, shape + (HEAD_DIM,), jnp.float32)
          for key, shape in zip(keys, shapes)]


def _llama_mask(segments):
  mask, _, _ = llama.attention_mask_and_positions(jnp.asarray(segments, jnp.int32), None)
  return mask


def _qllama_mask(mode, num_queries=3):
  text = np.array([[1] * 9, [1] * 6 + [0] * 3], bool)
  mask, _ = qllama.attention_mask_and_positions(mode, jnp.asarray(text), num_queries)
  return mask


RIGHT_PADDED = [[1] * 9 + [0] * 3, [1] * 12]
LEFT_PADDED = [[0] * 4 + [1] * 8, [1] * 12]
PACKED = [[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0], [1] * 5 + [2] * 7]

# name: (mask, inputs); self-attention over 12 tokens unless the inputs say otherwise.
CASES = {
    "bidirectional": (None, _inputs()),
    "bidirectional_padded": (attention.AttentionMask(jnp.asarray(RIGHT_PADDED, jnp.int32),
                                                     jnp.asarray(RIGHT_PADDED, jnp.int32)),
                             _inputs()),
    "causal_right_padded": (_llama_mask(RIGHT_PADDED), _inputs()),
    "causal_left_padded": (_llama_mask(LEFT_PADDED), _inputs()),
    "packed_causal": (_llama_mask(PACKED), _inputs()),
    "qllama_itm": (_qllama_mask("itm"), _inputs()),
    "qllama_itc": (_qllama_mask("itc"), _inputs()),
    "qllama_itg": (_qllama_mask("itg"), _inputs()),
    "qllama_modes_in_one_pass": (
        tuple(_qllama_mask(mode) for mode in ("itm", "itc", "itg")), _inputs(batch=6)),
    "cross_attention": (None, _inputs(q_length=3, kv_length=10)),
    "attention_pooling": (None, _inputs(q_length=1, kv_length=10)),
    "grouped_query_packed": (_llama_mask(PACKED), _inputs(kv_heads=2)),
}


def _real_queries(mask, q_length):
  """(batch, q_length) True where the query is real, the rows every implementation agrees on."""
  masks = mask if isinstance(mask, tuple) else (mask,)
  return np.concatenate([np.ones((2, q_length), bool) if m is None or m.q_segments is None
                         else np.asarray(m.q_segments) > 0 for m in masks])


@functools.cache
def _reference():
  return jax.jit(attention.xla_attention)


IMPLEMENTATIONS = {
    "cudnn_translation": lambda q, k, v, m: attention.per_chunk(
        functools.partial(attention.cudnn_attention, implementation="xla"), q, k, v, m),
    "splash_interpret": lambda q, k, v, m: attention.attention(q, k, v, m, SPLASH),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_xla_reference_on_real_queries(case, implementation):
  mask, (q, k, v) = CASES[case]
  full = attention.AttentionMask() if mask is None else mask
  expected = _reference()(q, k, v, full)
  actual = jax.jit(IMPLEMENTATIONS[implementation])(q, k, v, full)
  real = _real_queries(mask, q.shape[1])
  np.testing.assert_allclose(np.asarray(actual)[real], np.asarray(expected)[real], atol=1e-5,
                             rtol=1e-5)


def test_grouped_query_heads_read_the_key_value_head_of_their_group():
  q, k, v = _inputs(kv_heads=2)
  mask = _llama_mask(PACKED)
  reference = jax.jit(attention.attention, static_argnums=4)
  grouped = reference(q, k, v, mask, AttentionConfig("xla"))
  # transformers' repeat_kv: query head h reads key/value head h // 2.
  repeated = reference(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask,
                       AttentionConfig("xla"))
  np.testing.assert_allclose(grouped, repeated, atol=1e-6)
  with pytest.raises(ValueError, match="4 query heads cannot be grouped over 3"):
    attention.attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), None,
                        AttentionConfig("xla"))


def test_splash_gradients_match_the_xla_reference():
  mask, (q, k, v) = CASES["grouped_query_packed"]
  real = jnp.asarray(_real_queries(mask, LENGTH))[:, :, None, None]
  cotangent = jax.random.normal(jax.random.key(1), q.shape) * real

  def grads(implementation):
    loss = lambda *qkv: jnp.sum(implementation(*qkv, mask) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for expected, actual in zip(grads(attention.xla_attention),
                              grads(IMPLEMENTATIONS["splash_interpret"])):
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [2, 1])
def test_splash_under_a_mesh_splits_what_divides_and_matches_the_xla_reference(rows):
  """Rows and heads split over data x tensor (grouped heads stay with their key/value heads);
  a batch of one row, which cannot split, runs whole on every device."""
  mask, (q, k, v) = CASES["grouped_query_packed"]
  mask = jax.tree.map(lambda x: x[:rows], mask)
  q, k, v = (x[:rows] for x in (q, k, v))
  mesh_config = sharding.MeshConfig(data=2, tensor=2)
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:4])
  with sharding.sharding_context(mesh, mesh_config.logical_rules):
    actual = jax.jit(IMPLEMENTATIONS["splash_interpret"])(q, k, v, mask)
  real = _real_queries(mask, LENGTH)[:rows]
  np.testing.assert_allclose(np.asarray(actual)[real],
                             np.asarray(_reference()(q, k, v, mask))[real], atol=1e-5, rtol=1e-5)


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of primitive `name` in `jaxpr` and the jaxprs nested in its equations."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          count += _count_primitive(getattr(sub, "jaxpr", sub), name)
  return count


def test_every_attention_of_internvl_g_runs_the_configured_kernel():
  """InternViT, QLLaMA's three stage-2 masks and its cross-attention, both attention poolings: ten
  attention calls, each a splash kernel when the towers' configs say so, none otherwise."""
  def kernels(attention_config):
    config = internvl_preset("tiny").replace(
        vision=internvl_preset("tiny").vision.replace(attention=attention_config),
        text=internvl_preset("tiny").text.replace(attention=attention_config))
    size = config.vision.image_size
    pixels = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((3, 2, 6), jnp.int32)
    forward = lambda params, *inputs: internvl.InternVLG(config).apply({"params": params}, *inputs)
    jaxpr = jax.make_jaxpr(forward)(internvl.abstract_params(config), pixels, tokens, tokens)
    return _count_primitive(jaxpr.jaxpr, "pallas_call")

  assert kernels(SPLASH) == 10
  assert kernels(AttentionConfig("xla")) == 0


def test_model_json_keeps_the_attention_config_and_older_files_load_the_default():
  config = internvl_preset("tiny", vision=internvl_preset("tiny").vision.replace(attention=SPLASH))
  data = formats.config_to_json(config)
  assert formats.config_from_json(data) == config
  del data["config"]["vision"]["attention"]
  assert formats.config_from_json(data).vision.attention == AttentionConfig()


def test_bad_attention_configs_and_masks_give_clear_errors():
  with pytest.raises(ValueError, match="'flash' is not one of"):
    AttentionConfig("flash")
  with pytest.raises(ValueError, match="block_kv 384 a multiple of block_kv_compute"):
    AttentionConfig(block_kv=384, block_kv_compute=256)
  with pytest.raises(ValueError, match="both queries and keys"):
    attention.AttentionMask(jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="only means something when causal"):
    attention.AttentionMask(prefix=2)
