"""QLLaMA captioning (spec 3.4): InternViT's tokens, then beam search after an "English caption:"
prompt, with the reference's settings (5 beams, 8 to 30 new tokens).

`QLlamaCaptionDecoder` is QLLaMA as a `generate.Decoder`: its prefill runs the queries and the
prompt with cross-attention into the vision tokens (`context`), its steps are cached causal steps
that never look at them again.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from internvl_jax import generate
from internvl_jax.config import InternVLConfig, QLlamaConfig
from internvl_jax.models import qllama
from internvl_jax.models.internvl import InternVLG


@dataclasses.dataclass(frozen=True)
class QLlamaCaptionDecoder:
  """QLLaMA params and (batch, tokens, vision_width) vision features as `context`."""

  config: QLlamaConfig

  def init_cache(self, batch, max_length):
    return qllama.init_cache(self.config, batch, max_length)

  def prefill(self, params, tokens, attention_mask, cache, context):
    return qllama.QLlama(self.config).apply({"params": params}, tokens, attention_mask, context,
                                            cache, method=qllama.QLlama.prefill)

  def step(self, params, tokens, cache, context):
    del context  # used once, by the prefill
    return qllama.QLlama(self.config).apply({"params": params}, tokens, cache,
                                            method=qllama.QLlama.decode)


@functools.partial(jax.jit, static_argnums=0)
def vision_tokens(config: InternVLConfig, params, pixels: jax.Array) -> jax.Array:
  """InternViT's last-block tokens, CLS included: what QLLaMA cross-attends to."""
  return InternVLG(config).apply({"params": params}, pixels,
                                 method=lambda model, p: model.vision_model(p).last_hidden_state)


def caption(config: InternVLConfig, params, pixels: jax.Array, prompt_ids: jax.Array,
            prompt_mask: jax.Array | None = None, *, num_beams: int = 5, min_new_tokens: int = 8,
            max_new_tokens: int = 30, length_penalty: float = 1.0,
            early_stopping: bool | str = False) -> tuple[jax.Array, jax.Array]:
  """Captions of (batch, height, width, channels) `pixels` by InternVL-G `params`.

  `prompt_ids` (batch or 1, length) are the tokenized prompt ("English caption:" with BOS and no
  EOS, right-padded, `prompt_mask` marking real tokens); one row serves every image. Returns the
  (batch, max_new_tokens) caption ids, padded after EOS, and their beam scores.
  """
  vision = vision_tokens(config, params, pixels)
  prompt_ids = jnp.asarray(prompt_ids)
  batch = vision.shape[0]
  if prompt_ids.ndim != 2 or prompt_ids.shape[0] not in (1, batch):
    raise ValueError(f"prompt_ids must be (1 or {batch}, length) for {batch} images; got shape "
                     f"{prompt_ids.shape}.")
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt_ids.shape, bool)
  prompt_mask = jnp.asarray(prompt_mask)
  if prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"prompt_mask has shape {prompt_mask.shape}, prompt_ids {prompt_ids.shape}.")
  shape = (batch, prompt_ids.shape[1])
  return generate.beam_search(
      QLlamaCaptionDecoder(config.qllama), params["qllama"], jnp.broadcast_to(prompt_ids, shape),
      jnp.broadcast_to(prompt_mask, shape), vision, num_beams=num_beams,
      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_id=config.text.eos_id,
      pad_id=config.text.pad_id, length_penalty=length_penalty, early_stopping=early_stopping)
