"""InternVL-G: the sizes of InternVL-14B, the encoders against InternVL-C and QLLaMA on the same
weights, and the stage-2 forward against separate passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.models import qllama
from internvl_jax.models.intern_vit import InternViT
from internvl_jax.models.internvl import (AttentionPooling, InternVLC, InternVLG, abstract_params,
                                          init_params, l2_normalize)

CONFIG = internvl_preset("tiny", vision=vision_preset("tiny", hidden_size=48, mlp_dim=96),
                         text=llama_preset("tiny", num_layers=4))
TOKENS = np.array([[1, 17, 30, 99, 2, 0], [1, 120, 2, 0, 0, 0]], np.int32)
MASK = TOKENS != 0
PIXELS = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)


@functools.cache
def _params():
  rng = np.random.default_rng(0)
  params = init_params(CONFIG)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


@functools.partial(jax.jit, static_argnames=("model", "method", "mode"))
def _apply(params, *args, model=InternVLG, method="__call__", **kwargs):
  return model(CONFIG).apply({"params": params}, *args, method=getattr(model, method), **kwargs)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_internvl_14b_sizes_are_the_released_ones():
  params = abstract_params(internvl_preset("14b-224"))
  assert _count(params) == 13_834_975_747  # InternViT-6B + QLLaMA (untied lm_head) + heads
  cross_attention = params["qllama"]["layers"]["layer_0"]["cross_attn"]
  assert _count(cross_attention) == 956_418_048  # 16 blocks
  assert cross_attention["k_proj"]["kernel"].shape == (16, 3200, 32, 128)
  assert params["qllama"]["query_tokens"].shape == (1, 96, 4096)
  assert _count(params["clip_projector2"]) == 53_515_008
  assert params["itm_head"]["kernel"].shape == (4096, 2)
  assert params["qllama"]["lm_head"]["kernel"].shape == (4096, 49954)


def _internvl_c_params(params):
  """InternVL-C on the same weights: QLLaMA's LLaMA weights are its text tower."""
  shared = {name: params[name] for name in ("vision_model", "clip_projector", "text_projection",
                                            "logit_scale")}
  return shared | {"text_model": qllama.llama_params(params["qllama"], CONFIG.qllama)}


def test_c_mode_and_text_encoder_are_internvl_c_on_the_same_weights():
  params = _params()
  c_params = _internvl_c_params(params)
  np.testing.assert_allclose(_apply(params, PIXELS, method="encode_image", mode="C"),
                             _apply(c_params, PIXELS, model=InternVLC, method="encode_image"),
                             atol=1e-6)
  np.testing.assert_allclose(_apply(params, TOKENS, MASK, method="encode_text"),
                             _apply(c_params, TOKENS, MASK, model=InternVLC, method="encode_text"),
                             atol=1e-5)


def _image_mode_queries(params):
  tokens = InternViT(CONFIG.vision).apply({"params": params["vision_model"]}, PIXELS).last_hidden_state
  return qllama.QLlama(CONFIG.qllama).apply({"params": params["qllama"]}, None, None, tokens,
                                            mode="image").queries


def _pool2(params, queries):
  pool = AttentionPooling(CONFIG.attn_pool_heads, CONFIG.embed_dim, CONFIG.attn_pool_eps)
  return pool.apply({"params": params["clip_projector2"]}, queries)


def test_g_mode_adds_the_pooled_queries_and_normalizes_again():
  params = _params()
  image = _apply(params, PIXELS, method="encode_image")  # mode "G" by default
  contrastive = _apply(params, PIXELS, method="encode_image", mode="C")
  expected = l2_normalize(contrastive + l2_normalize(_pool2(params, _image_mode_queries(params))))
  np.testing.assert_allclose(image, expected, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="mode must be 'C' or 'G'"):
    InternVLG(CONFIG).apply({"params": params}, PIXELS, mode="X", method=InternVLG.encode_image)


def test_stage2_forward_equals_separate_passes():
  params = _params()
  # ITM: row 0 a negative caption, row 1 the positive one; ITC and ITG: prefixed captions.
  itm = np.array([[1, 44, 45, 2, 0, 0], [1, 17, 30, 99, 2, 0]], np.int32)
  tokens = np.stack([itm, TOKENS, TOKENS[:, ::-1].copy() * MASK])
  mask = np.stack([itm != 0, MASK, MASK])
  out = _apply(params, PIXELS, tokens, mask)
  assert out.itm_logits.shape == (2, 2) and out.lm_logits.shape == (2, 6, CONFIG.text.vocab_size)
  assert out.itm_logits.dtype == jnp.float32 and out.lm_logits.dtype == jnp.float32
  # ITC: the text is the text encoder's; the queries cannot see it, so they are the image mode's.
  np.testing.assert_allclose(out.text_features, _apply(params, TOKENS, MASK, method="encode_text"),
                             atol=1e-5)
  np.testing.assert_allclose(out.image_features,
                             l2_normalize(_pool2(params, _image_mode_queries(params))), atol=1e-5)
  np.testing.assert_allclose(out.logit_scale, params["logit_scale"])
  # ITM and ITG, each in a pass of its own against the same image tokens.
  vit = InternViT(CONFIG.vision).apply({"params": params["vision_model"]}, PIXELS).last_hidden_state
  model = qllama.QLlama(CONFIG.qllama)
  own = lambda mode, t, m: model.apply({"params": params["qllama"]}, t, m, vit, mode=mode)
  kernel, bias = params["itm_head"]["kernel"], params["itm_head"]["bias"]
  itm_logits = jnp.mean(own("itm", itm, itm != 0).queries @ kernel + bias, axis=1)
  np.testing.assert_allclose(out.itm_logits, itm_logits, atol=1e-5)
  itg_logits = model.apply({"params": params["qllama"]}, own("itg", tokens[2], mask[2]).text,
                           method=qllama.QLlama.logits)
  np.testing.assert_allclose(out.lm_logits[mask[2]], itg_logits[mask[2]], atol=1e-4, rtol=1e-5)


def test_stage2_inputs_are_checked():
  model, variables = InternVLG(CONFIG), {"params": _params()}
  with pytest.raises(ValueError, match=r"stage-2 tokens must be \(3, batch, length\)"):
    model.apply(variables, PIXELS, TOKENS, MASK)
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model.apply(variables, PIXELS, np.stack([TOKENS] * 3), np.stack([MASK] * 2))
  with pytest.raises(ValueError, match=r"variant='D' is not one of \('C', 'G'\)"):
    CONFIG.replace(variant="D")
