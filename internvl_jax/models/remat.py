"""Rematerialization of the scanned blocks, with policies chosen by name.

Each tower's config (`VisionConfig.remat_policy`, `LlamaConfig.remat_policy`, which QLLaMA's text
tower shares) names the policy that `remat` wraps its block in. The backward pass needs values of
the forward pass ("residuals"); a policy says which are kept in device memory, which are moved to
host memory and back, and which are recomputed from the block's inputs.

The shared layers (`layers.py`) tag the values worth keeping with `checkpoint_name`; these names
are the whole vocabulary:

  query_proj, key_proj, value_proj  q, k and v from their projections (before QK-norm and RoPE)
  attention_out                     attention's output, the input of the output projection
  out_proj                          the output projection's output
  mlp_in                            the MLP's input projections, before the activation (fc1;
                                    gate_proj and up_proj)
  mlp_out                           the MLP's output projection (fc2; down_proj)

Policies, from most device memory (least recomputation) to least:

  none                    no remat: every residual is kept
  dots_saveable           every matmul output is kept (attention's logits included)
  dots_no_batch_saveable  matmuls without batch dimensions are kept: the projections, not attention
  save_<set>              the named values of <set> (below) are kept; the rest is recomputed
  offload_<set>           the named values of <set> go to pinned host memory in the forward pass
                          and come back for the backward; the rest is recomputed
  full                    only the block's inputs are kept: the whole block is recomputed

The sets, named as MaxText's policies of the same names:

  qkv_proj                     query_proj, key_proj, value_proj
  out_proj                     out_proj
  attention_out                attention_out
  dot_except_mlp               qkv_proj and out_proj
  dot_with_context_except_mlp  qkv_proj, attention_out and out_proj
  dot_except_mlp_in            qkv_proj, out_proj and mlp_out
"""

from typing import Callable

import flax.linen as nn
import jax

CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "out_proj", "mlp_in",
                    "mlp_out")

_QKV = ("query_proj", "key_proj", "value_proj")
NAMED_SETS: dict[str, tuple[str, ...]] = {
    "qkv_proj": _QKV,
    "out_proj": ("out_proj",),
    "attention_out": ("attention_out",),
    "dot_except_mlp": _QKV + ("out_proj",),
    "dot_with_context_except_mlp": _QKV + ("attention_out", "out_proj"),
    "dot_except_mlp_in": _QKV + ("out_proj", "mlp_out"),
}


def _offload(names: tuple[str, ...]) -> Callable:
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=(), names_which_can_be_offloaded=names, offload_src="device",
      offload_dst="pinned_host")


POLICIES: dict[str, Callable | None] = {
    "none": None,  # not wrapped
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch_saveable": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    **{f"save_{s}": jax.checkpoint_policies.save_only_these_names(*names)
       for s, names in NAMED_SETS.items()},
    **{f"offload_{s}": _offload(names) for s, names in NAMED_SETS.items()},
}


def check_policy(policy: str) -> None:
  if policy not in POLICIES:
    raise ValueError(f"remat_policy={policy!r} is not one of {tuple(POLICIES)} (see "
                     "internvl_jax/models/remat.py).")


def remat(module_cls: type[nn.Module], policy: str) -> type[nn.Module]:
  """`module_cls` wrapped in rematerialization with the named policy ("none": as it is)."""
  check_policy(policy)
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=POLICIES[policy], prevent_cse=False)
