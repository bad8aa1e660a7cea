"""InternVL-C: attention pooling against a PyTorch transcription of the reference, sizes, and
the text feature at the last real token."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from internvl_jax.config import internvl_preset
from internvl_jax.models.internvl import AttentionPooling, InternVLC, abstract_params, init_params


def _torch_attention_pooling(x, p, num_heads, eps=1e-5):
  """spec 3.1, written the reference's way: q from the token mean, three LayerNorms, 16 heads."""
  ln = lambda t, n: torch.nn.functional.layer_norm(t, t.shape[-1:], p[n]["scale"], p[n]["bias"], eps)
  proj = lambda t, n: t @ p["cross_attn"][n]["kernel"].flatten(1) + p["cross_attn"][n]["bias"].flatten()
  q_in, k_in, v_in = ln(x.mean(1, keepdim=True), "norm_q"), ln(x, "norm_k"), ln(x, "norm_v")
  b, n, c = x.shape
  heads = lambda t: t.reshape(b, t.shape[1], num_heads, -1).permute(0, 2, 1, 3)
  q, k, v = heads(proj(q_in, "q_proj")), heads(proj(k_in, "k_proj")), heads(proj(v_in, "v_proj"))
  attn = (q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1)
  out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, 1, c)
  o = p["cross_attn"]["o_proj"]
  return (out @ o["kernel"].flatten(0, 1) + o["bias"])[:, 0]


def test_attention_pooling_matches_the_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 9, 32)).astype(np.float32)
  module = AttentionPooling(num_heads=4, out_dim=12)
  params = nn.meta.unbox(module.init(jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda a: (np.asarray(a) + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)
  ours = module.apply({"params": params}, x)
  theirs = _torch_attention_pooling(torch.from_numpy(x), jax.tree.map(torch.from_numpy, params), 4)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=1e-5)


def test_internvl_c_sizes_are_the_released_ones():
  params = abstract_params(internvl_preset("14b-224", variant="C"))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(params["clip_projector"]) == 33_207_168
  assert params["text_projection"].shape == (4096, 768)
  assert count(params) == 12_620_029_697  # InternViT-6B + LLaMA-7B without lm_head + heads


def test_text_feature_is_the_last_real_token_and_embeddings_are_unit_norm():
  config = internvl_preset("tiny", variant="C")
  params = init_params(config)
  apply = jax.jit(functools.partial(InternVLC(config).apply, {"params": params}),
                  static_argnames="method")
  tokens = jnp.asarray([[1, 5, 9, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
  mask = tokens > 0
  text = apply(tokens, mask, method=InternVLC.encode_text)
  # Padding never changes the features: the same rows without the trailing pads.
  alone = apply(tokens[:1, :4], mask[:1, :4], method=InternVLC.encode_text)
  np.testing.assert_allclose(text[:1], alone, atol=1e-6)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  image, text, scale = apply(pixels, tokens, mask)
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, np.log(1 / 0.07), rtol=1e-6)
