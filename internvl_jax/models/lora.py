"""LoRA (Hu et al., 2021) on the layers the official fine-tuning wraps with PEFT (chat spec 6.1).

An adapter is two params beside a `layers.Dense` kernel: `lora_a` (inputs..., r), `lora_b`
(r, outputs...), initialised as PEFT does, B zero so that a fresh adapter changes nothing. The
layer then computes

  y = dense(x) + (alpha / r) * dropout(x) A B

The adapters are added by intercepting `Dense.__call__` (flax `nn.intercept_methods`) of the
target layers while a chat model is initialised or applied (`adapters`), not by a LoRA option on
every module that builds a Dense: the models stay as they are, the adapters are made by the same
`init` (so a scanned stack gets stacked adapters, with the kernel's logical axis names), and the
low-rank path runs inside the layer, so a train step never forms a full-size weight gradient.
`merge` folds them into the kernels, as the official `tools/merge_lora.py` (spec 4.5) does.

The official target modules of every family are the same matrices here (the converters split
InternLM2's fused wqkv / w1-w3 and Phi-3's qkv_proj / gate_up_proj): the ViT's attn qkv / proj and
mlp fc1 / fc2; the LLM's q/k/v/o and gate/up/down projections.
"""

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvl_jax.config import ChatConfig, LoraConfig
from internvl_jax.models import layers

VISION_TARGETS = r"^vision_model/blocks/(attn/(qkv|proj)|mlp/fc[12])$"
LLM_TARGETS = r"^language_model/layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$"
# Adapter params, for the optimizer's `trainable` regexes.
ADAPTER_PARAMS = r"/lora_[ab]$"


def _rank(config: LoraConfig, module_path: str) -> int:
  if re.search(VISION_TARGETS, module_path):
    return config.vision_rank
  if re.search(LLM_TARGETS, module_path):
    return config.llm_rank
  return 0


@contextlib.contextmanager
def adapters(config: LoraConfig | None, train: bool = False):
  """Within it, the target Dense layers of a chat model (the root module) create and apply
  adapters. `train` applies the dropout, with the "dropout" rng (which scanned stacks split per
  layer)."""
  if config is None:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, layers.Dense):
      return next_fun(*args, **kwargs)
    rank = _rank(config, "/".join(module.path))
    if not rank:
      return next_fun(*args, **kwargs)
    (x,) = args
    axis = tuple(sorted(a % x.ndim for a in module.axis))
    in_names = module.names[:len(axis)]
    # PEFT's init of A: kaiming_uniform(a=sqrt(5)), i.e. uniform within 1 / sqrt(fan_in).
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                              in_axis=tuple(range(len(axis))), out_axis=-1)
    a = module.param("lora_a", layers.logical_param(a_init, in_names + (None,)),
                     tuple(x.shape[i] for i in axis) + (rank,))
    b = module.param("lora_b", layers.logical_param(nn.initializers.zeros,
                                                    (None,) + module.names[len(axis):]),
                     (rank,) + module.features)
    h = x
    if train and config.dropout:
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.dropout, x.shape)
      h = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
    dtype = module.dtype
    low = jax.lax.dot_general(h.astype(dtype), a.astype(dtype),
                              ((axis, tuple(range(len(axis)))), ((), ())))
    delta = jnp.tensordot(low, b.astype(dtype), axes=1)
    return next_fun(*args, **kwargs) + (config.alpha_per_rank * delta).astype(dtype)

  with nn.intercept_methods(interceptor):
    yield


def merge(config, params: dict) -> tuple[object, dict]:
  """(config without `lora`, params with each kernel += (alpha / r) A B and no adapters): a plain
  model that computes what the adapted one does, for export and evaluation. Any other model
  config, or a chat model without adapters, comes back as it is."""
  if not isinstance(config, ChatConfig) or config.lora is None:
    return config, params
  scale = config.lora.alpha_per_rank

  def fold(node):
    if not isinstance(node, dict):
      return node
    node = {name: fold(child) for name, child in node.items()}
    if "lora_a" not in node:
      return node
    a, b, kernel = (node.pop(name) for name in ("lora_a", "lora_b", "kernel"))
    # kernel (stack..., in..., out...), a (stack..., in..., r), b (stack..., r, out...).
    stack = a.ndim + b.ndim - kernel.ndim - 2
    lead = kernel.shape[:stack]
    delta = jnp.matmul(jnp.reshape(a, lead + (-1, a.shape[-1])).astype(jnp.float32),
                       jnp.reshape(b, lead + (b.shape[stack], -1)).astype(jnp.float32))
    merged = jnp.asarray(kernel, jnp.float32) + scale * delta.reshape(kernel.shape)
    return dict(node, kernel=merged.astype(kernel.dtype))

  return config.replace(lora=None), fold(params)


def with_base(base: dict, adapted: dict) -> dict:
  """`base`'s params (e.g. a released checkpoint's) with the adapters of `adapted` (params of the
  same model with adapters) added: a warm start keeps its fresh adapters."""
  if not isinstance(base, dict) or not isinstance(adapted, dict):
    return base
  out = {name: with_base(child, adapted.get(name)) for name, child in base.items()}
  out.update((name, adapted[name]) for name in ("lora_a", "lora_b") if name in adapted)
  return out
