"""QLLaMA captioning: cached decoding against the uncached "itg" forward, the vision tokens acting
through the prefill only, EOS, batching of padded prompts, and `caption` on InternVL-G."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from internvl_jax import caption, generate
from internvl_jax.config import QLlamaConfig, internvl_preset, llama_preset, vision_preset
from internvl_jax.models import qllama
from internvl_jax.models.internvl import init_params

CONFIG = QLlamaConfig(text=llama_preset("tiny", num_layers=4), vision_width=48, num_queries=4)
Q, EOS, PAD = CONFIG.num_queries, CONFIG.text.eos_id, CONFIG.text.pad_id
# Right-padded prompts of 5 and 3 real tokens.
PROMPTS = np.array([[1, 17, 30, 99, 4], [1, 120, 3, 0, 0]], np.int32)
MASK = PROMPTS != 0
VISION = np.random.default_rng(1).normal(size=(2, 5, 48)).astype(np.float32)
DECODER = caption.QLlamaCaptionDecoder(CONFIG)
SEARCH = dict(max_new_tokens=6, min_new_tokens=2, eos_id=EOS, pad_id=PAD)


def _perturbed(params, seed=0):
  """Every leaf perturbed, so that the norm scales and the queries matter too."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), params)


PARAMS = _perturbed(qllama.init_params(CONFIG))


@jax.jit
def _prefill(params, tokens, mask, vision, cache):
  return DECODER.prefill(params, tokens, mask, cache, vision)


@jax.jit
def _step(params, tokens, cache, vision):
  return DECODER.step(params, tokens, cache, vision)


@jax.jit
def _uncached_logits(params, tokens, mask, vision):
  model = qllama.QLlama(CONFIG)
  text = model.apply({"params": params}, tokens, mask, vision, mode="itg").text
  return model.apply({"params": params}, text, method=qllama.QLlama.logits)


def test_cached_decoding_equals_the_uncached_itg_forward():
  generated = np.array([[5, 60, 7, 81], [42, 9, 110, 3]], np.int32)
  cache = DECODER.init_cache(2, PROMPTS.shape[1] + generated.shape[1])
  logits, cache = _prefill(PARAMS, PROMPTS, MASK, VISION, cache)
  cached = [np.asarray(logits)]
  for t in range(generated.shape[1]):
    logits, cache = _step(PARAMS, generated[:, t:t + 1], cache, VISION)
    cached.append(np.asarray(logits))
  for row in range(2):
    # Each row alone, unpadded: its prompt, then the generated tokens.
    real = PROMPTS[row, MASK[row]]
    sequence = np.concatenate([real, generated[row]])[None]
    full = np.asarray(_uncached_logits(PARAMS, sequence, None, VISION[row:row + 1]))[0]
    np.testing.assert_allclose(cached[0][row, :len(real)], full[:len(real)], atol=1e-5, rtol=1e-5)
    for t in range(generated.shape[1]):
      np.testing.assert_allclose(cached[t + 1][row, 0], full[len(real) + t], atol=1e-5, rtol=1e-5)


def test_vision_acts_through_the_prefill_only():
  other_vision = VISION[::-1] + 1.0
  cache = DECODER.init_cache(2, PROMPTS.shape[1] + 1)
  _, cache = _prefill(PARAMS, PROMPTS, MASK, VISION, cache)
  _, other_cache = _prefill(PARAMS, PROMPTS, MASK, other_vision, cache)
  token = np.array([[5], [42]], np.int32)
  logits, _ = _step(PARAMS, token, cache, VISION)
  with_other_context, _ = _step(PARAMS, token, cache, other_vision)
  np.testing.assert_array_equal(with_other_context, logits)
  # The same step on the other image's cache: the image reached the step through the queries.
  from_other_cache, _ = _step(PARAMS, token, other_cache, VISION)
  assert np.abs(np.asarray(from_other_cache) - np.asarray(logits)).max() > 1e-3


def test_one_beam_is_greedy():
  greedy = generate.greedy_search(DECODER, PARAMS, PROMPTS, MASK, VISION, **SEARCH)
  beams, _ = generate.beam_search(DECODER, PARAMS, PROMPTS, MASK, VISION, num_beams=1, **SEARCH)
  np.testing.assert_array_equal(beams, greedy)


@pytest.mark.parametrize("num_beams", [0, 3], ids=["greedy", "beams"])
def test_padded_batch_rows_decode_as_each_row_alone(num_beams):
  def search(prompts, mask, vision):
    if num_beams:
      return np.asarray(generate.beam_search(DECODER, PARAMS, prompts, mask, vision,
                                             num_beams=num_beams, **SEARCH)[0])
    return np.asarray(generate.greedy_search(DECODER, PARAMS, prompts, mask, vision, **SEARCH))

  batch = search(PROMPTS, MASK, VISION)
  for row in range(2):
    real = PROMPTS[row:row + 1, MASK[row]]
    np.testing.assert_array_equal(batch[row], search(real, None, VISION[row:row + 1])[0])


def test_generation_stops_at_eos():
  # Decoded with an EOS id that never comes, then with whatever came third in row 0 as EOS: each
  # row ends at its first occurrence.
  unused = CONFIG.text.vocab_size - 1
  free = np.asarray(generate.greedy_search(DECODER, PARAMS, PROMPTS, MASK, VISION,
                                           **dict(SEARCH, min_new_tokens=0, eos_id=unused)))
  assert unused not in free
  eos = int(free[0, 2])
  stopped = np.asarray(generate.greedy_search(DECODER, PARAMS, PROMPTS, MASK, VISION,
                                              **dict(SEARCH, min_new_tokens=0, eos_id=eos)))
  for row in range(2):
    end = list(free[row]).index(eos) + 1 if eos in free[row] else free.shape[1]
    np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
    assert (stopped[row, end:] == PAD).all()


@dataclasses.dataclass(frozen=True)
class EosBias:
  """The caption decoder with a logit bias that makes EOS the certain next token."""

  decoder: caption.QLlamaCaptionDecoder

  def init_cache(self, batch, max_length):
    return self.decoder.init_cache(batch, max_length)

  def prefill(self, params, tokens, attention_mask, cache, context):
    logits, cache = self.decoder.prefill(params, tokens, attention_mask, cache, context)
    return logits.at[..., EOS].add(50.0), cache

  def step(self, params, tokens, cache, context):
    logits, cache = self.decoder.step(params, tokens, cache, context)
    return logits.at[..., EOS].add(50.0), cache


def test_beams_end_with_eos_after_min_new_tokens():
  tokens, _ = generate.beam_search(EosBias(DECODER), PARAMS, PROMPTS, MASK, VISION, num_beams=3,
                                   **SEARCH)
  tokens = np.asarray(tokens)
  assert (tokens[:, :2] != EOS).all()
  assert (tokens[:, 2] == EOS).all() and (tokens[:, 3:] == PAD).all()


def test_prefill_checks_the_cache_size():
  with pytest.raises(ValueError, match="do not fit a cache of 8 slots"):
    DECODER.prefill(PARAMS, PROMPTS, MASK, qllama.init_cache(CONFIG, 2, 8 - Q), VISION)


INTERNVL = internvl_preset("tiny", vision=vision_preset("tiny", hidden_size=48, mlp_dim=96),
                           text=llama_preset("tiny", num_layers=4))


@functools.cache
def _internvl_params():
  return _perturbed(init_params(INTERNVL))


def test_caption_runs_internvit_then_five_beams():
  params = _internvl_params()
  pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  prompt = np.array([[1, 17, 30]], np.int32)  # one prompt for every image
  tokens, scores = caption.caption(INTERNVL, params, pixels, prompt)
  assert tokens.shape == (2, 30) and scores.shape == (2,)
  vision = caption.vision_tokens(INTERNVL, params, pixels)
  assert vision.shape == (2, INTERNVL.vision.num_positions, INTERNVL.vision.hidden_size)
  expected, expected_scores = generate.beam_search(
      caption.QLlamaCaptionDecoder(INTERNVL.qllama), params["qllama"], np.repeat(prompt, 2, 0),
      None, vision, num_beams=5, max_new_tokens=30, min_new_tokens=8, eos_id=INTERNVL.text.eos_id,
      pad_id=INTERNVL.text.pad_id)
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
  assert (np.asarray(tokens)[:, :8] != INTERNVL.text.eos_id).all()


def test_caption_checks_the_prompt_batch():
  pixels = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=r"prompt_ids must be \(1 or 2, length\)"):
    caption.caption(INTERNVL, _internvl_params(), pixels, np.ones((3, 4), np.int32))
