"""Numerical parity with transformers.InternVLVisionModel on weights converted from JAX."""

import numpy as np
import pytest
import torch
import transformers

from internvl_jax.convert.pytorch import export_pytorch
from internvl_jax.models.intern_vit import InternViT
from vit_fixtures import LAYERNORM_QKV_BIAS, RMS_QKNORM, random_params, random_pixels


@pytest.mark.parametrize("config", [RMS_QKNORM, LAYERNORM_QKV_BIAS], ids=["rmsnorm-qknorm", "layernorm-qkvbias"])
@pytest.mark.parametrize("image_hw", [(32, 32), (48, 40)], ids=["trained-res", "other-res"])
def test_matches_transformers(tmp_path, config, image_hw):
  params = random_params(config)
  export_pytorch(config, params, str(tmp_path), layout="transformers")
  reference, info = transformers.InternVLVisionModel.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  pixels = random_pixels((2, *image_hw, 3))
  with torch.no_grad():
    theirs = reference.eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  ours = InternViT(config).apply({"params": params}, pixels, return_hidden_states=True)

  np.testing.assert_allclose(ours.last_hidden_state, theirs.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
  assert len(theirs.hidden_states) == config.num_layers + 1
  for layer in range(config.num_layers + 1):  # the embeddings, then every block
    np.testing.assert_allclose(ours.hidden_states[layer], theirs.hidden_states[layer].numpy(),
                               atol=1e-5, rtol=1e-5)
