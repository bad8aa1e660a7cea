"""Losses against plain numpy references, sharded over 8 devices for the contrastive ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from internvl_jax import losses, sharding
from internvl_jax.config import llama_preset
from internvl_jax.models import llama

BATCH, DIM = 16, 8


def normalized(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def softmax(x, axis):
  return np.exp(log_softmax(x, axis))


def clip_reference(image, text, logit_scale, valid):
  """Loss and gradients (image, text, logit_scale) of the symmetric InfoNCE, in float64."""
  image, text = image.astype(np.float64), text.astype(np.float64)
  scale = np.exp(logit_scale)
  logits = scale * image @ text.T
  weights = valid / valid.sum()
  eye = np.eye(len(image))
  loss = -0.5 * (np.sum(weights * np.diag(log_softmax(logits, 1))) +
                 np.sum(weights * np.diag(log_softmax(logits, 0))))
  d_logits = 0.5 * (weights[:, None] * (softmax(logits, 1) - eye) +
                    weights[None, :] * (softmax(logits, 0) - eye))
  return loss, (scale * d_logits @ text, scale * d_logits.T @ image, np.sum(d_logits * logits))


def sigmoid_reference(image, text, logit_scale, logit_bias):
  image, text = image.astype(np.float64), text.astype(np.float64)
  logits = np.exp(logit_scale) * image @ text.T + logit_bias
  signs = 2 * np.eye(len(image)) - 1
  return np.sum(np.log1p(np.exp(-signs * logits))) / len(image)


@pytest.fixture(scope="module")
def pairs():
  rng = np.random.default_rng(0)
  image = normalized(rng, (BATCH, DIM))
  text = normalized(rng, (BATCH, DIM))
  text[:BATCH // 2] = normalized(rng, (BATCH // 2, DIM)) * 0.3 + image[:BATCH // 2]
  return image, (text / np.linalg.norm(text, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1))


def sharded_value_and_grad(loss_fn, mesh, num_args):
  """Jitted over the mesh: the embeddings split by rows, everything else replicated."""
  rows, whole = sharding.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
  return jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(num_args)), has_aux=True),
                 in_shardings=(rows, rows) + (whole,) * (num_args - 2))


@pytest.mark.parametrize("use_valid", [False, True])
def test_clip_loss_and_gradients_sharded_match_numpy(pairs, mesh, use_valid):
  image, text = pairs
  valid = np.arange(BATCH) % 3 != 1 if use_valid else np.ones(BATCH, bool)
  logit_scale = np.float32(np.log(1 / 0.07))
  step = sharded_value_and_grad(
      lambda i, t, s: losses.clip_softmax_loss(i, t, s, valid=jnp.asarray(valid)), mesh, 3)
  with sharding.sharding_context(mesh, sharding.RULES):
    assert "sharding_constraint" in step.lower(image, text, logit_scale).as_text()
    (loss, metrics), grads = step(image, text, logit_scale)
  assert grads[0].sharding.spec == PartitionSpec(sharding.BATCH_AXES)
  ref_loss, ref_grads = clip_reference(image, text, float(logit_scale), valid.astype(np.float64))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, atol=1e-6, rtol=1e-4)
  logits = image @ text.T
  i2t = (logits.argmax(1) == np.arange(BATCH))[valid].mean()
  t2i = (logits.argmax(0) == np.arange(BATCH))[valid].mean()
  np.testing.assert_allclose([metrics["i2t_accuracy"], metrics["t2i_accuracy"]], [i2t, t2i])


def test_clip_logit_scale_clamp_stops_its_gradient(pairs):
  image, text = pairs
  loss_fn = lambda s: losses.clip_softmax_loss(image, text, s, max_logit_scale=np.log(100.0))[0]
  above = jax.grad(loss_fn)(jnp.float32(6.0))
  below = jax.grad(loss_fn)(jnp.float32(2.0))
  _, metrics = losses.clip_softmax_loss(image, text, jnp.float32(6.0),
                                        max_logit_scale=np.log(100.0))
  np.testing.assert_allclose(metrics["logit_scale"], 100.0, rtol=1e-6)
  assert above == 0.0 and below != 0.0
  np.testing.assert_allclose(loss_fn(jnp.float32(6.0)), loss_fn(jnp.float32(np.log(100.0))))


def test_clip_loss_with_no_valid_pair_is_zero(pairs):
  image, text = pairs
  loss, grads = jax.value_and_grad(
      lambda i: losses.clip_softmax_loss(i, text, 2.0, valid=jnp.zeros(BATCH, bool))[0])(image)
  assert loss == 0.0 and np.all(np.asarray(grads) == 0.0)


def test_sigmoid_loss_sharded_matches_numpy_and_single_device(pairs, mesh):
  image, text = pairs
  scale, bias = np.float32(np.log(10.0)), np.float32(-10.0)
  step = sharded_value_and_grad(
      lambda i, t, s, b: losses.sigmoid_loss(i, t, s, b), mesh, 4)
  with sharding.sharding_context(mesh, sharding.RULES):
    (loss, _), grads = step(image, text, scale, bias)
  np.testing.assert_allclose(loss, sigmoid_reference(image, text, scale, bias), rtol=1e-5)
  (_, _), single = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3), has_aux=True)(
      image, text, scale, bias)
  for grad, ref in zip(grads, single):
    np.testing.assert_allclose(grad, ref, atol=1e-6, rtol=1e-5)


def test_itm_loss_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 2)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 1])
  valid = np.array([True, False, True, True, True, False])
  loss, metrics = losses.itm_loss(logits, labels, valid)
  nll = -log_softmax(logits.astype(np.float64), 1)[np.arange(6), labels]
  np.testing.assert_allclose(loss, nll[valid].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["itm_accuracy"],
                             (logits.argmax(1) == labels)[valid].mean())
  assert losses.itm_loss(logits, labels, np.zeros(6, bool))[0] == 0.0


def test_lm_loss_shifts_and_ignores_positions():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  labels = np.array([[-100, -100, 3, 4, 5], [7, 8, 9, -100, -100]])
  loss, num_tokens = losses.lm_loss(jnp.asarray(logits, jnp.bfloat16), labels)
  log_probs = log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), -1)
  nll = [-log_probs[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 5)
         if labels[b, t] != -100]
  assert num_tokens == 5 and len(nll) == 5
  np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)


def test_lm_loss_with_every_label_ignored_is_zero_not_nan():
  logits = jnp.ones((2, 4, 7))
  labels = jnp.full((2, 4), -100)
  (loss, num_tokens), grads = jax.value_and_grad(
      lambda x: losses.lm_loss(x, labels), has_aux=True)(logits)
  assert loss == 0.0 and num_tokens == 0
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads) == 0.0)


def lm_rows(seed, batch=3, length=11, width=8, vocab=37):
  """Hidden states, a head and labels with ignored positions, the last row invalid."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
  head = (0.5 * rng.normal(size=(width, vocab))).astype(np.float32)
  labels = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  labels[0, :4] = labels[1, -3:] = -100
  return hidden, head, labels, np.arange(batch) != batch - 1


def weighted(example_losses):
  """A scalar that weighs each row differently, so that gradients reach the right rows."""
  nll, counts = example_losses
  return jnp.sum(nll * jnp.arange(1.0, nll.shape[0] + 1)), (nll, counts)


@pytest.mark.parametrize("block_size", [1, 8, 37, 64])  # 8: 37 is no multiple, the last shifts
def test_chunked_lm_losses_and_gradients_match_the_full_logits(block_size):
  hidden, head, labels, valid = lm_rows(3)
  full = lambda h, w: weighted(losses.lm_example_losses(
      jnp.einsum("blw,wv->blv", h, w), labels, valid=valid))
  chunked = lambda h, w: weighted(losses.chunked_lm_example_losses(
      h, w, labels, block_size=block_size, valid=valid))
  (_, (nll, counts)), grads = jax.value_and_grad(full, (0, 1), has_aux=True)(hidden, head)
  (_, (chunked_nll, chunked_counts)), chunked_grads = jax.jit(
      jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, head)
  assert counts.tolist() == [7, 7, 0]
  np.testing.assert_array_equal(chunked_counts, counts)
  np.testing.assert_allclose(chunked_nll, nll, rtol=1e-5)
  assert chunked_nll[2] == 0.0 and np.all(chunked_grads[0][2] == 0.0)
  for grad, ref in zip(chunked_grads, grads):
    np.testing.assert_allclose(grad, ref, atol=1e-5)


def test_chunked_lm_token_losses_and_their_gradients_per_position_match_the_full_logits():
  hidden, head, labels, valid = lm_rows(6)
  position_weights = np.random.default_rng(6).random((3, 10)).astype(np.float32)

  def full(h, w):
    targets, counted = losses._next_token_targets(labels, -100, valid)
    nll = losses._cross_entropy(jnp.einsum("blw,wv->blv", h, w)[:, :-1], targets)
    return jnp.sum(jnp.where(counted, nll, 0.0) * position_weights), (nll, counted)

  def chunked(h, w):
    nll, counted = losses.chunked_lm_token_losses(h, w, labels, block_size=8, valid=valid)
    return jnp.sum(nll * position_weights), (nll, counted)

  (_, (nll, counted)), grads = jax.value_and_grad(full, (0, 1), has_aux=True)(hidden, head)
  (_, (chunked_nll, chunked_counted)), chunked_grads = jax.jit(
      jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, head)
  np.testing.assert_array_equal(chunked_counted, counted)
  np.testing.assert_allclose(chunked_nll, np.where(counted, nll, 0.0), rtol=1e-5)
  for grad, ref in zip(chunked_grads, grads):
    np.testing.assert_allclose(grad, ref, atol=1e-5)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_chunked_lm_losses_with_the_models_head_match_its_logits(tie_embeddings):
  config = llama_preset("tiny", num_layers=1, vocab_size=53, tie_embeddings=tie_embeddings)
  params = llama.init_params(config)
  _, _, labels, valid = lm_rows(4, vocab=config.vocab_size)
  tokens = np.maximum(labels, 0)
  model = llama.Llama(config)
  full = lambda p: weighted(losses.lm_example_losses(
      model.apply({"params": p}, tokens).logits, labels, valid=valid))
  chunked = lambda p: weighted(losses.chunked_lm_example_losses(
      model.apply({"params": p}, tokens, return_logits=False).hidden_state,
      llama.head_kernel(config, p), labels, block_size=16, valid=valid))
  (loss, _), grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
  (chunked_loss, _), chunked_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
  assert ("lm_head" in grads) != tie_embeddings
  np.testing.assert_allclose(chunked_loss, loss, rtol=1e-5)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5), chunked_grads, grads)


def vocabulary_wide_arrays(fn, *args, tokens, vocab):
  """Shapes in `fn`'s jaxpr, nested ones included, that hold `tokens` x `vocab` or more entries
  and have a `vocab`-long axis."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shape = getattr(var.aval, "shape", ())
        if vocab in shape and np.prod(shape) >= tokens * vocab:
          found.append(shape)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_chunked_lm_losses_never_hold_the_tokens_by_vocabulary_logits():
  hidden, head, labels, valid = lm_rows(5, batch=4, length=9, width=4, vocab=101)
  tokens = 4 * 8  # the scored positions; the head is (4, 101), smaller
  step = lambda loss: jax.value_and_grad(lambda h, w: weighted(loss(h, w)), (0, 1), has_aux=True)
  full = step(lambda h, w: losses.lm_example_losses(h @ w, labels, valid=valid))
  chunked = step(lambda h, w: losses.chunked_lm_example_losses(h, w, labels, block_size=32,
                                                               valid=valid))
  assert (4, 8, 101) in vocabulary_wide_arrays(full, hidden, head, tokens=tokens, vocab=101)
  assert vocabulary_wide_arrays(chunked, hidden, head, tokens=tokens, vocab=101) == []
