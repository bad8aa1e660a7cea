"""A training step's attention compiled ahead of time for a TPU topology, on this CPU host: "auto"
picks splash there, and its forward and backward kernels run in `shard_map` over a data x tensor
mesh (Mosaic kernels cannot be partitioned by XLA)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies

from internvl_jax import sharding
from internvl_jax.config import llama_preset
from internvl_jax.models import llama


@pytest.mark.own_process
def test_tpu_compile_of_a_packed_llama_step_uses_the_splash_kernels():
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
  mesh_config = sharding.MeshConfig(data=2, tensor=2)
  mesh, rules = sharding.make_mesh(mesh_config, devices), mesh_config.logical_rules
  config = llama_preset("tiny")
  assert config.attention.implementation == "auto"
  model = llama.Llama(config)
  boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), jnp.zeros((1, 1), jnp.int32))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(boxed["params"]),
                        sharding.param_shardings(boxed["params"], mesh, rules))
  rows = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sharding.batch_sharding(mesh))

  def loss(params, tokens, segment_ids):
    return jnp.mean(model.apply({"params": params}, tokens, segment_ids).logits)

  with sharding.sharding_context(mesh, rules):
    hlo = jax.jit(jax.grad(loss)).lower(params, rows, rows).compile().as_text()
  kernels = set(re.findall(r"splash_mha_\w+", hlo))
  assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
          "splash_mha_dkv_segmented_no_residuals"} <= kernels, kernels
  assert 'custom_call_target="tpu_custom_call"' in hlo
