"""The jitted train step: accumulation exact for whole-batch losses, non-finite steps skipped.

Accumulation caches features (open_clip's --accum-freq): a gradient-free forward over each
micro-batch collects its features; the loss of the whole batch is differentiated w.r.t. the
features (and params the loss uses directly, e.g. the temperature); then each micro-batch is
run forward again and its slice of the feature gradient is pulled back through it. The result is
the gradient of the whole-batch loss, at the cost of one extra forward, with activation memory of
one micro-batch. A step whose loss or gradients are not finite leaves params and optimizer state
unchanged and is counted.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from internvl_jax import optim
from internvl_jax.train import stage as stage_lib
from internvl_jax.train.state import TrainState


def split_micro_batches(batch, num: int):
  """(batch, ...) -> (num, batch / num, ...): micro-batch i holds rows i, i + num, ...

  Strided rows keep every micro-batch spread over all data-parallel devices (each device's
  contiguous rows split into `num` groups), so no data moves between devices.
  """
  def split(x):
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def merge_micro_batches(tree):
  """(num, micro, ...) -> (num * micro, ...): micro-batch major (a fixed permutation of rows)."""
  def merge(x):
    x = x.reshape((-1,) + x.shape[2:])
    return nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1))
  return jax.tree.map(merge, tree)


def unmerge_micro_batches(tree, num: int):
  """The inverse of `merge_micro_batches`."""
  def unmerge(x):
    x = x.reshape((num, -1) + x.shape[1:])
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(unmerge, tree)


def _accumulated_grads(stage, params_of, trainable, batch, rng, num: int, grad_shardings):
  """Loss, metrics and gradient of the whole-batch loss, one micro-batch of activations at a time."""
  micro = split_micro_batches(batch, num)
  encode = lambda t, mb, i: stage.encode(params_of(t), mb, jax.random.fold_in(rng, i))
  indices = jnp.arange(num)

  _, features = jax.lax.scan(
      lambda _, xs: (None, jax.lax.stop_gradient(encode(trainable, *xs))), None, (micro, indices))
  features = merge_micro_batches(features)
  (loss, metrics), (grads, feature_grads) = jax.value_and_grad(
      lambda t, f: stage.loss(params_of(t), f, merge_micro_batches(micro)),
      argnums=(0, 1), has_aux=True)(trainable, features)
  feature_grads = unmerge_micro_batches(feature_grads, num)

  def backward(acc, xs):
    mb, i, cotangent = xs
    _, pullback = jax.vjp(lambda t: encode(t, mb, i), trainable)
    acc = jax.tree.map(jnp.add, acc, pullback(cotangent)[0])
    if grad_shardings is not None:
      acc = jax.lax.with_sharding_constraint(acc, grad_shardings)
    return acc, None

  grads, _ = jax.lax.scan(backward, grads, (micro, indices, feature_grads))
  return loss, metrics, grads


def make_train_step(stage, optimizer_config: optim.OptimizerConfig, mask, accum_steps: int = 1,
                    grad_shardings=None):
  """`step(state, batch) -> (state, metrics)`, to jit with the state donated.

  `mask` is the trainable mask; frozen params get no gradient and no optimizer state.
  `grad_shardings` (the trainable params' shardings) keeps accumulated gradients sharded.
  """
  tx = optim.make_optimizer(optimizer_config)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = optim.partition(state.params, mask)
    params_of = lambda t: optim.merge(t, frozen)
    if accum_steps == 1:
      (loss, metrics), grads = jax.value_and_grad(
          lambda t: stage_lib.loss_fn(stage, params_of(t), batch, jax.random.fold_in(rng, 0)),
          has_aux=True)(trainable)
    else:
      loss, metrics, grads = _accumulated_grads(stage, params_of, trainable, batch, rng,
                                                accum_steps, grad_shardings)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
      trainable, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state

    trainable, opt_state = jax.lax.cond(finite, apply, lambda operands: operands,
                                        (trainable, state.opt_state))
    bad = (~finite).astype(jnp.int32)
    applied = state.step - state.skipped  # updates before this one: the schedule's position
    new_state = state.replace(
        step=state.step + 1, params=params_of(trainable), opt_state=opt_state,
        skipped=state.skipped + bad, bad_streak=(state.bad_streak + bad) * bad)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped_steps=new_state.skipped,
                   bad_streak=new_state.bad_streak)
    metrics.update((f"lr/{name}", lr) for name, lr in
                   optim.learning_rates(optimizer_config, applied).items())
    return new_state, metrics

  return step


def jit_train_step(step, state_shardings, batch_sharding):
  """The step jitted with its shardings and the state donated (updated in place)."""
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)
