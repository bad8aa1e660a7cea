"""The optimizer against a numpy AdamW, its masks on InternViT params, and frozen params."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internvl_jax import optim
from internvl_jax.config import vision_preset
from internvl_jax.models.intern_vit import abstract_params

DEPTH = 2


def toy_params(seed=0):
  """Two towers and a loose scalar; "vision" has a scanned stack of DEPTH blocks."""
  rng = np.random.default_rng(seed)
  shapes = {
      "vision": {"embeddings": {"pos_embed": (1, 3, 4), "patch_embed": {"kernel": (2, 4),
                                                                       "bias": (4,)}},
                 "blocks": {"mlp": {"kernel": (DEPTH, 4, 3)}, "ls1": (DEPTH, 4)}},
      "text": {"kernel": (4, 3), "bias": (3,)},
      "logit_scale": (),
  }
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def size(tree) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


CONFIG = optim.OptimizerConfig(
    learning_rate=5e-3, lr_groups=(("vision", "^vision/", 1e-2), ("text", "^text/", 1e-3)),
    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.5, warmup_steps=1,
    total_steps=5, end_lr_ratio=0.1,
    layer_decay=(optim.LayerDecay(rate=0.5, depth=DEPTH, prefix="^vision/"),))


def reference_lr(name: str, step: int) -> np.ndarray:
  """Peak lr of the group x layer-decay scale (L = DEPTH + 2) x warmup-cosine fraction."""
  if step < CONFIG.warmup_steps:
    fraction = step / CONFIG.warmup_steps
  else:
    progress = (step - CONFIG.warmup_steps) / (CONFIG.total_steps - CONFIG.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    fraction = CONFIG.end_lr_ratio + (1 - CONFIG.end_lr_ratio) * cosine
  peak = 1e-2 if name.startswith("vision/") else 1e-3 if name.startswith("text/") else 5e-3
  scale = np.float64(1.0)
  if name.startswith("vision/embeddings/"):
    scale = 0.5**3
  elif name.startswith("vision/blocks/"):
    scale = np.array([0.5**2, 0.5**1]).reshape((DEPTH,) + (1,) * (1 if name.endswith("ls1") else 2))
  return peak * scale * fraction


def reference_adamw(params, grads_per_step):
  """torch.optim.AdamW semantics, with clipping, written out in float64."""
  names = [optim.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  for step, grads in enumerate(grads_per_step):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm = math.sqrt(sum(np.sum(x * x) for x in g))
    g = [x * min(1.0, CONFIG.grad_clip_norm / norm) for x in g]
    for i, name in enumerate(names):
      m[i] = CONFIG.b1 * m[i] + (1 - CONFIG.b1) * g[i]
      v[i] = CONFIG.b2 * v[i] + (1 - CONFIG.b2) * g[i]**2
      m_hat = m[i] / (1 - CONFIG.b1**(step + 1))
      v_hat = v[i] / (1 - CONFIG.b2**(step + 1))
      decays = not any(name.endswith(s) for s in ("bias", "pos_embed", "ls1", "logit_scale"))
      update = m_hat / (np.sqrt(v_hat) + CONFIG.eps) + CONFIG.weight_decay * p[i] * decays
      p[i] = p[i] - reference_lr(name, step) * update
  return jax.tree.unflatten(jax.tree.structure(params), p)


def test_adamw_with_groups_layer_decay_clipping_and_schedule_matches_numpy():
  params = toy_params()
  grads_per_step = [toy_params(seed) for seed in range(1, 5)]
  tx = optim.make_optimizer(CONFIG)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ours = params
  for grads in grads_per_step:
    updates, state = update(grads, state, ours)
    ours = optax.apply_updates(ours, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
               ours, reference_adamw(params, grads_per_step))


def test_learning_rates_per_group_follow_warmup_and_cosine():
  config = optim.OptimizerConfig(learning_rate=1e-4, lr_groups=(("vision", "^vision/", 1e-3),),
                                 warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
  at = lambda step: {k: float(v) for k, v in optim.learning_rates(config, step).items()}
  np.testing.assert_allclose(list(at(0).values()), [0.0, 0.0])
  np.testing.assert_allclose(list(at(5).values()), [0.5e-4, 0.5e-3], rtol=1e-6)
  np.testing.assert_allclose(list(at(10).values()), [1e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(list(at(60).values()), [0.55e-4, 0.55e-3], rtol=1e-5)
  np.testing.assert_allclose(list(at(110).values()), [1e-5, 1e-4], rtol=1e-5)
  assert list(at(0)) == ["default", "vision"]


def test_weight_decay_mask_and_layer_decay_on_intern_vit_params():
  params = abstract_params(vision_preset("tiny"))
  decayed = {optim.path_name(p) for p, d in
             jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(optim.OptimizerConfig(),
                                                                          params))[0] if d}
  assert decayed == {"embeddings/patch_embed/kernel", "blocks/attn/qkv/kernel",
                     "blocks/attn/proj/kernel", "blocks/mlp/fc1/kernel", "blocks/mlp/fc2/kernel"}

  config = optim.OptimizerConfig(learning_rate=1.0, layer_decay=(optim.LayerDecay(0.9, depth=2),))
  multipliers = optim.lr_multipliers(config, params)
  np.testing.assert_allclose(multipliers["embeddings"]["pos_embed"], 0.9**3)
  qkv = multipliers["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.shape == (2, 1, 1, 1, 1)
  np.testing.assert_allclose(qkv.ravel(), [0.9**2, 0.9])
  np.testing.assert_allclose(multipliers["blocks"]["ls1"].ravel(), [0.9**2, 0.9])


def test_layer_decay_needs_the_stack_on_the_leading_axis():
  decay = optim.LayerDecay(0.9, depth=3)
  with pytest.raises(ValueError, match="blocks/w .* depth 3"):
    decay.scale("blocks/w", (2, 4))


def test_frozen_params_get_no_state_no_gradient_and_no_change():
  config = optim.OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, trainable=("^vision/",),
                                 frozen=("pos_embed",))
  params = toy_params()
  mask = optim.trainable_mask(config, params)
  trainable, frozen = optim.partition(params, mask)
  assert size(trainable) + size(frozen) == size(params)
  assert size(frozen) == 3 * 4 + 4 * 3 + 3 + 1  # pos_embed, the text tower, logit_scale

  tx = optim.make_optimizer(config)
  state = tx.init(trainable)
  assert size(state) == 2 * size(trainable) + 2  # the two moments and two step counts
  assert size(tx.init(params)) == size(state)  # the full tree holds no more

  loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
  grads = jax.grad(lambda t: loss(optim.merge(t, frozen)))(trainable)
  updates, _ = tx.update(grads, state, trainable)
  new = optim.merge(optax.apply_updates(trainable, updates), frozen)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
    name, before = optim.path_name(path), params
    for key in name.split("/"):
      before = before[key]
    changed = not np.array_equal(leaf, before)
    assert changed == config.is_trainable(name), name

  full_updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  np.testing.assert_array_equal(full_updates["text"]["kernel"], 0.0)
  np.testing.assert_allclose(full_updates["vision"]["blocks"]["ls1"],
                             updates["vision"]["blocks"]["ls1"])


def test_a_frozen_6b_vision_tower_holds_no_adam_moments():
  params = abstract_params(vision_preset("6b-224"))
  config = optim.OptimizerConfig(trainable=("ls1$",))
  state = jax.eval_shape(optim.make_optimizer(config).init, params)
  assert size(state) == 2 * 48 * 3200 + 2


@pytest.mark.parametrize("changes, message", [
    ({"warmup_steps": 10, "total_steps": 10}, "warmup_steps < total_steps"),
    ({"end_lr_ratio": 2.0}, "end_lr_ratio"),
    ({"b2": 1.0}, "betas"),
    ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"lr_groups": (("a", "x", 1.0), ("a", "y", 1.0))}, "unique"),
])
def test_bad_configs_fail_with_a_message(changes, message):
  with pytest.raises(ValueError, match=message):
    optim.OptimizerConfig(**changes)


def test_trainable_layers_train_a_slice_of_a_frozen_stack():
  # As the official freeze_backbone + unfreeze_vit_layers=-1: the last of DEPTH blocks trains.
  config = optim.OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, trainable=("^text/",),
                                 trainable_layers=(("^vision/blocks/", -1),))
  params = toy_params()
  mask = optim.trainable_mask(config, params)
  np.testing.assert_array_equal(mask["vision"]["blocks"]["mlp"]["kernel"], [False, True])
  assert mask["vision"]["embeddings"]["pos_embed"] is False
  trainable, frozen = optim.partition(params, mask)
  tx = optim.make_optimizer(config)
  state = tx.init(trainable)
  # The stack keeps its state whole; the rest of the frozen tower holds none.
  assert size(state) == 2 * (size(params["text"]) + size(params["vision"]["blocks"])) + 2

  loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
  grads = jax.grad(lambda t: loss(optim.merge(t, frozen)))(trainable)
  updates, _ = tx.update(grads, state, trainable)
  new = optim.merge(optax.apply_updates(trainable, updates), frozen)
  for before, after in ((params["vision"]["blocks"]["mlp"]["kernel"],
                         new["vision"]["blocks"]["mlp"]["kernel"]),
                        (params["vision"]["blocks"]["ls1"], new["vision"]["blocks"]["ls1"])):
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.any(after[1] == before[1])
  np.testing.assert_array_equal(new["vision"]["embeddings"]["pos_embed"],
                                params["vision"]["embeddings"]["pos_embed"])
  assert not np.array_equal(new["text"]["kernel"], params["text"]["kernel"])
