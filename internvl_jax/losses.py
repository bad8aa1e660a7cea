"""Training losses: contrastive over the global batch (softmax and sigmoid), ITM and next-token.

Each returns (loss, metrics). The contrastive losses take the whole global batch as (sharded)
arrays and are written as the plain single-device maths; under `jit` XLA partitions them. The
(batch, batch) logits are constrained to rows over the batch mesh axes ("activation_batch") and
columns whole, so each device scores its own rows against every column (the reference's gather of
the other side), and the gradient of that gather comes back to each row's owner.

The next-token loss takes logits (`lm_example_losses`), or, in training, the final hidden states
and the LM head (`chunked_lm_example_losses`, per position `chunked_lm_token_losses`): the same
sums, with the (tokens, vocab) logits never materialized.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over the True positions; 0 (not NaN) when there are none."""
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _normalizer_and_target(logits: jax.Array, targets: jax.Array):
  """(logsumexp, target logit) over the last axis, in float32.

  The target logit is picked with a one-hot product rather than a gather, so that logits split
  over the vocabulary (tensor parallel) are reduced in place instead of gathered whole.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1), picked


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] over the last axis, in float32."""
  normalizer, picked = _normalizer_and_target(logits, targets)
  return normalizer - picked


def _pair_logits(image_emb, text_emb, logit_scale, max_logit_scale):
  if max_logit_scale is not None:
    logit_scale = jnp.minimum(logit_scale, max_logit_scale)  # no gradient above the clamp
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  logits = scale * jnp.einsum("id,td->it", image_emb, text_emb,
                              preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits, ("activation_batch", None)), scale


def clip_softmax_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array, *,
                      max_logit_scale: float | None = None, valid: jax.Array | None = None):
  """Symmetric InfoNCE: the mean of image->text and text->image cross-entropies (spec 4.1).

  `image_emb`, `text_emb`: (batch, dim) L2-normalized features, row i of each a pair.
  `logit_scale`: the learnable log-temperature; logits are exp(logit_scale) * cosine, with
  logit_scale clamped at `max_logit_scale` (CLIP uses log(100)) when given. `valid` (batch,)
  drops pairs from the average (the reference ignores empty texts); they stay negatives.
  """
  logits, scale = _pair_logits(image_emb, text_emb, logit_scale, max_logit_scale)
  positives = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
  text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
  loss = 0.5 * (_masked_mean(image_to_text, valid) + _masked_mean(text_to_image, valid))
  targets = jnp.arange(logits.shape[0])
  metrics = {
      "i2t_accuracy": _masked_mean(
          (jnp.argmax(logits, axis=1) == targets).astype(jnp.float32), valid),
      "t2i_accuracy": _masked_mean(
          (jnp.argmax(logits, axis=0) == targets).astype(jnp.float32), valid),
      "logit_scale": scale,
  }
  return loss, metrics


def multi_positive_clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                             positives: jax.Array, valid: jax.Array, *,
                             max_logit_scale: float | None = None):
  """Symmetric InfoNCE with soft targets (retrieval fine-tuning, spec 4.3): the mean of
  image->text and text->image cross-entropies against `positives` (batch, batch) bool, weighted
  uniformly per row (BLIP's `pos / pos.sum`).

  `positives` must be symmetric and hold the diagonal of the `valid` rows; unlike
  `clip_softmax_loss`, columns where `valid` is False are left out of every softmax (rows out of
  the averages).
  """
  logits, scale = _pair_logits(image_emb, text_emb, logit_scale, max_logit_scale)
  targets = positives.astype(jnp.float32)
  targets = targets / jnp.maximum(jnp.sum(targets, axis=1, keepdims=True), 1.0)

  def direction(scores):  # rows score every valid column
    masked = jnp.where(valid[None, :], scores, jnp.finfo(jnp.float32).min)
    nll = jax.nn.logsumexp(masked, axis=1) - jnp.sum(targets * scores, axis=1)
    hit = jnp.take_along_axis(positives, jnp.argmax(masked, axis=1)[:, None], axis=1)[:, 0]
    return _masked_mean(nll, valid), _masked_mean(hit.astype(jnp.float32), valid)

  image_to_text, i2t_accuracy = direction(logits)
  text_to_image, t2i_accuracy = direction(logits.T)
  return 0.5 * (image_to_text + text_to_image), {
      "i2t_accuracy": i2t_accuracy, "t2i_accuracy": t2i_accuracy, "logit_scale": scale}


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array, *, max_logit_scale: float | None = None):
  """SigLIP: every (image, text) pair is a binary classification, positive on the diagonal.

  Summed over all batch^2 pairs and divided by the batch size, as SigLIP does.
  """
  logits, scale = _pair_logits(image_emb, text_emb, logit_scale, max_logit_scale)
  logits = logits + jnp.asarray(logit_bias, jnp.float32)
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
  return loss, {"logit_scale": scale, "logit_bias": logit_bias}


def itm_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None):
  """Image-text matching: cross-entropy of (batch, 2) logits against 0 (negative) / 1 (positive)
  labels, averaged over the `valid` rows."""
  nll = _cross_entropy(logits, labels)
  accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return _masked_mean(nll, valid), {"itm_accuracy": _masked_mean(accuracy, valid)}


def _next_token_targets(labels: jax.Array, ignore_index: int, valid: jax.Array | None):
  """(targets, counted), both (batch, length - 1): labels[t + 1] at position t, and whether it
  counts (not `ignore_index`, in a row where `valid` is True); targets are 0 where it does not."""
  targets = labels[:, 1:]
  counted = targets != ignore_index
  if valid is not None:
    counted &= valid[:, None]
  return jnp.where(counted, targets, 0), counted


def lm_example_losses(logits: jax.Array, labels: jax.Array, *, ignore_index: int = -100,
                      valid: jax.Array | None = None):
  """Next-token cross-entropy per row: (summed over the row's counted tokens, their number).

  Sums add up exactly over micro-batches, so the mean over a whole batch is exact under
  feature-cached accumulation (stage 2's ITG, chat SFT). Alignment and `ignore_index` as in
  `lm_loss`; rows where `valid` (batch,) is False (batch padding) count no token.
  """
  targets, counted = _next_token_targets(labels, ignore_index, valid)
  nll = _cross_entropy(logits[:, :-1], targets)
  return jnp.sum(jnp.where(counted, nll, 0.0), axis=1), jnp.sum(counted, axis=1)


def chunked_lm_token_losses(hidden: jax.Array, head: jax.Array, labels: jax.Array, *,
                            block_size: int, ignore_index: int = -100,
                            valid: jax.Array | None = None):
  """Next-token cross-entropy of the logits `hidden @ head` at each position: (nll, counted),
  both (batch, length - 1), nll 0 where the target does not count; computed `block_size`
  vocabulary columns at a time so that no (batch, length, vocab) array exists, in the forward or
  the backward pass. Per-position values let a packed row weight each of its samples.

  `hidden` (batch, length, width): the LLM's final-normed states, in its compute dtype; `head`
  (width, vocab): the LM head's kernel, or the transposed embedding when tied
  (`llama.head_kernel`). Alignment, `ignore_index` and `valid` as in `lm_example_losses`. Each
  block's logits are the matmul in `hidden`'s dtype accumulated in float32 (the model's head
  rounds its logits to the compute dtype, so under bfloat16 the two differ by that rounding); a
  running log-sum-exp and the target logit carry over the blocks. The backward pass (a custom
  VJP) recomputes each block's logits, so a training step projects onto the vocabulary once more
  than with the logits kept. A block's logits are (batch, length, block_size) float32. A block as
  wide as the vocabulary keeps its logits for the backward pass instead (plain autodiff): they are
  one block, so recomputing them would save no memory.

  Blocks split the vocabulary, as Levanter's blockwise loss does, rather than the tokens: each
  block's slice of the head gradient is then reduced over the data-parallel rows once, where
  token blocks would all-reduce the whole head gradient once per block. A vocabulary not
  divisible by the block ends with a block shifted back to stay inside the head, its columns
  that the block before scored masked out, so the head is never padded (copied). Under a
  tensor-parallel vocabulary ("vocab" over a mesh axis) XLA gathers the head to slice it.
  """
  if block_size < 1:
    raise ValueError(f"chunked_lm_token_losses: block_size must be at least 1, got {block_size}.")
  targets, counted = _next_token_targets(labels, ignore_index, valid)
  if block_size >= head.shape[1]:
    logits = jnp.einsum("blw,wv->blv", hidden[:, :-1], head.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.where(counted, _cross_entropy(logits, targets), 0.0), counted
  return _blocked_nll(hidden[:, :-1], head, targets, counted, block_size), counted


def chunked_lm_example_losses(hidden: jax.Array, head: jax.Array, labels: jax.Array, *,
                              block_size: int, ignore_index: int = -100,
                              valid: jax.Array | None = None):
  """`lm_example_losses` of the logits `hidden @ head`: per-row sums of
  `chunked_lm_token_losses` and the number of counted tokens."""
  nll, counted = chunked_lm_token_losses(hidden, head, labels, block_size=block_size,
                                         ignore_index=ignore_index, valid=valid)
  return jnp.sum(nll, axis=1), jnp.sum(counted, axis=1)


def _vocab_block(hidden, head, targets, index, block_size):
  """Block `index`'s (float32 logits, targets within the block or -1, head columns): columns
  [start, start + block_size) with start = min(index * block_size, vocab - block_size); those
  below index * block_size belong to the block before, and their logits are float32's minimum."""
  first = index * block_size
  start = jnp.minimum(first, head.shape[1] - block_size)
  columns = jax.lax.dynamic_slice_in_dim(head, start, block_size, axis=1)
  logits = jnp.einsum("blw,wv->blv", hidden, columns, preferred_element_type=jnp.float32)
  logits = jnp.where(start + jnp.arange(block_size) >= first, logits, jnp.finfo(jnp.float32).min)
  return logits, jnp.where(targets >= first, targets - start, -1), columns, start


def _num_blocks(head, block_size) -> int:
  return -(-head.shape[1] // block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_nll(hidden, head, targets, counted, block_size):
  """-log softmax(hidden @ head)[target] at the counted positions, 0 elsewhere."""
  return _blocked_nll_forward(hidden, head, targets, counted, block_size)[0]


def _blocked_nll_forward(hidden, head, targets, counted, block_size):
  """The sums, and as residuals the inputs and each position's log-sum-exp."""
  compute_head = head.astype(hidden.dtype)

  def block(carry, index):
    normalizer, picked = carry
    logits, block_targets, _, _ = _vocab_block(hidden, compute_head, targets, index, block_size)
    block_normalizer, block_picked = _normalizer_and_target(logits, block_targets)
    return (jnp.logaddexp(normalizer, block_normalizer), picked + block_picked), None

  empty = jnp.full(targets.shape, -jnp.inf, jnp.float32)
  (normalizer, picked), _ = jax.lax.scan(block, (empty, jnp.zeros(targets.shape, jnp.float32)),
                                         jnp.arange(_num_blocks(head, block_size)))
  nll = jnp.where(counted, normalizer - picked, 0.0)
  return nll, (hidden, head, targets, counted, normalizer)


def _blocked_nll_backward(block_size, residuals, d_nll):
  """Recomputes each block's logits: d logits = (softmax - one_hot(target)) * d_nll at the
  counted positions; d hidden accumulates over the blocks, d head is written block by block."""
  hidden, head, targets, counted, normalizer = residuals
  compute_head = head.astype(hidden.dtype)
  weight = jnp.where(counted, d_nll, 0.0)[..., None]

  def block(carry, index):
    d_hidden, d_head = carry
    logits, block_targets, columns, start = _vocab_block(hidden, compute_head, targets, index,
                                                         block_size)
    d_logits = (jnp.exp(logits - normalizer[..., None]) -
                jax.nn.one_hot(block_targets, block_size, dtype=logits.dtype))
    d_logits = (d_logits * weight).astype(hidden.dtype)
    d_hidden += jnp.einsum("blv,wv->blw", d_logits, columns, preferred_element_type=jnp.float32)
    # A shifted last block adds zeros to the columns of the block before (their d_logits are 0).
    d_columns = jnp.einsum("blw,blv->wv", hidden, d_logits, preferred_element_type=jnp.float32)
    d_head = jax.lax.dynamic_update_slice_in_dim(
        d_head, jax.lax.dynamic_slice_in_dim(d_head, start, block_size, axis=1) + d_columns,
        start, axis=1)
    return (d_hidden, d_head), None

  zeros = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(head.shape, jnp.float32))
  (d_hidden, d_head), _ = jax.lax.scan(block, zeros, jnp.arange(_num_blocks(head, block_size)))
  return d_hidden.astype(hidden.dtype), d_head.astype(head.dtype), None, None


_blocked_nll.defvjp(_blocked_nll_forward, _blocked_nll_backward)


def lm_loss(logits: jax.Array, labels: jax.Array, *, ignore_index: int = -100):
  """Next-token cross-entropy (ITG, chat SFT), averaged over the tokens that count.

  `labels` are aligned with the inputs, as in `transformers`: logits at position t predict
  labels[t + 1]; positions labelled `ignore_index` (padding, prompts, prefixes) do not count.
  Returns (loss, number of counted tokens); with none counted the loss is 0.
  """
  nll, counts = lm_example_losses(logits, labels, ignore_index=ignore_index)
  num_tokens = jnp.sum(counts)
  return jnp.sum(nll) / jnp.maximum(num_tokens, 1), num_tokens
