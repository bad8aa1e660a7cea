"""The analytic FLOP counts agree with XLA's on a one-layer model (XLA counts a scan body once)."""

import jax
import jax.numpy as jnp
import pytest

from internvl_jax.config import vision_preset
from internvl_jax.models.intern_vit import abstract_params
from internvl_jax.flops import vit_forward_flops
from internvl_jax.models.intern_vit import InternViT


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
