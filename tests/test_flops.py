"""The analytic FLOP counts agree with XLA's on one-layer models (XLA counts a scan body once)."""

import jax
import jax.numpy as jnp
import pytest

from internvl_jax.config import llama_preset, vision_preset
from internvl_jax.models.intern_vit import abstract_params
from internvl_jax.flops import llama_forward_flops, vit_forward_flops
from internvl_jax.models.intern_vit import InternViT
from internvl_jax.models.llama import Llama
from internvl_jax.models.llama import abstract_params as llama_abstract_params


@pytest.mark.parametrize("image_size", [32, 64])
def test_vit_forward_flops_match_xla(image_size):
  config = vision_preset("tiny", num_layers=1, hidden_size=128, mlp_dim=512)
  pixels = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  forward = jax.jit(lambda p, x: InternViT(config).apply({"params": p}, x).last_hidden_state)
  compiled = forward.lower(abstract_params(config), pixels).compile()
  xla_flops = compiled.cost_analysis()["flops"]
  analytic = vit_forward_flops(config, (image_size, image_size))
  # XLA also counts elementwise work (norms, softmax, GELU): a few percent on top of the matmuls.
  assert analytic <= xla_flops <= 1.1 * analytic


@pytest.mark.parametrize("length", [16, 48])
def test_llama_forward_flops_match_xla(length):
  config = llama_preset("tiny", num_layers=1, hidden_size=128, mlp_dim=384, num_kv_heads=2,
                        vocab_size=512)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  forward = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t).logits)
  xla_flops = forward.lower(llama_abstract_params(config), tokens).compile().cost_analysis()["flops"]
  analytic = llama_forward_flops(config, length)
  assert analytic <= xla_flops <= 1.1 * analytic
