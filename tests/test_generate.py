"""Greedy and beam search: agreement with transformers' generate, EOS handling, min_new_tokens."""

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from internvl_jax import generate
from llama_fixtures import GQA, export_transformers, random_params

CONFIG = GQA
EOS, PAD = CONFIG.eos_id, CONFIG.pad_id
# Ours are right-padded (rows of 6 and 4 real tokens); transformers needs left padding to generate.
PROMPTS = np.array([[1, 17, 30, 99, 4, 8], [1, 120, 3, 77, 0, 0]], np.int32)
MASK = PROMPTS != 0
LEFT_PADDED = np.array([[1, 17, 30, 99, 4, 8], [0, 0, 1, 120, 3, 77]], np.int64)


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


@pytest.fixture(scope="module")
def reference(params, tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama")
  export_transformers(CONFIG, params, directory)
  return transformers.LlamaForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()


def transformers_generate(model, max_new_tokens, **kwargs):
  with torch.no_grad():
    out = model.generate(
        torch.from_numpy(LEFT_PADDED), attention_mask=torch.from_numpy(LEFT_PADDED != 0).long(),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        return_dict_in_generate=True, output_scores=True, **kwargs)
  tokens = out.sequences[:, LEFT_PADDED.shape[1]:].numpy()
  # Ours always have max_new_tokens columns; transformers stops when every row is done.
  return np.pad(tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])), constant_values=PAD), out


DECODER = generate.LlamaDecoder(CONFIG)
SEARCH = dict(max_new_tokens=8, min_new_tokens=3, eos_id=EOS, pad_id=PAD)


def test_greedy_matches_transformers_with_either_padding(params, reference):
  theirs, _ = transformers_generate(reference, 8, min_new_tokens=3)
  right = generate.greedy_search(DECODER, params, PROMPTS, MASK, **SEARCH)
  left = generate.greedy_search(DECODER, params, LEFT_PADDED.astype(np.int32), LEFT_PADDED != 0, **SEARCH)
  np.testing.assert_array_equal(right, theirs)
  np.testing.assert_array_equal(left, theirs)


def test_beam_search_matches_transformers(params, reference):
  tokens, scores = generate.beam_search(DECODER, params, PROMPTS, MASK, num_beams=3, **SEARCH)
  theirs, out = transformers_generate(reference, 8, min_new_tokens=3, num_beams=3)
  np.testing.assert_array_equal(tokens, theirs)
  np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-5)


def test_beam_search_of_width_one_is_greedy(params):
  greedy = generate.greedy_search(DECODER, params, PROMPTS, MASK, **SEARCH)
  tokens, _ = generate.beam_search(DECODER, params, PROMPTS, MASK, num_beams=1, **SEARCH)
  np.testing.assert_array_equal(tokens, greedy)


@dataclasses.dataclass(frozen=True)
class EosBias:
  """The LLaMA decoder with a logit bias that makes EOS the certain next token."""

  decoder: generate.LlamaDecoder
  bias: float = 50.0

  def init_cache(self, batch, max_length):
    return self.decoder.init_cache(batch, max_length)

  def prefill(self, params, tokens, attention_mask, cache, context):
    logits, cache = self.decoder.prefill(params, tokens, attention_mask, cache, context)
    return logits.at[..., EOS].add(self.bias), cache

  def step(self, params, tokens, cache, context):
    return self.prefill(params, tokens, None, cache, context)


@pytest.mark.parametrize("min_new_tokens", [0, 3])
def test_eos_ends_every_row_after_min_new_tokens(params, min_new_tokens):
  search = dict(SEARCH, min_new_tokens=min_new_tokens)
  greedy = generate.greedy_search(EosBias(DECODER), params, PROMPTS, MASK, **search)
  beams, _ = generate.beam_search(EosBias(DECODER), params, PROMPTS, MASK, num_beams=3, **search)
  for tokens in (np.asarray(greedy), np.asarray(beams)):
    assert (tokens[:, :min_new_tokens] != EOS).all()
    assert (tokens[:, min_new_tokens] == EOS).all() and (tokens[:, min_new_tokens + 1:] == PAD).all()


@flax.struct.dataclass
class _Last:
  token: jax.Array  # (batch,)

  def take(self, rows):
    return _Last(self.token[rows])


@dataclasses.dataclass(frozen=True)
class CountingDecoder:
  """A fake model that counts up from the last prompt token and says EOS after `stop`."""

  stop: int
  vocab: int = 16

  def init_cache(self, batch, max_length):
    return _Last(jnp.zeros((batch,), jnp.int32))

  def _logits(self, tokens):
    following = jnp.where(tokens >= self.stop, EOS, tokens + 1)
    return 10.0 * jax.nn.one_hot(following, self.vocab)

  def prefill(self, params, tokens, attention_mask, cache, context):
    last = jnp.max(jnp.where(attention_mask, tokens, 0), axis=1)  # prompts count up too
    return self._logits(tokens), _Last(last)

  def step(self, params, tokens, cache, context):
    return self._logits(tokens), _Last(tokens[:, 0])


@pytest.mark.parametrize("num_beams", [0, 2], ids=["greedy", "beams"])
def test_finished_rows_are_padded_while_others_go_on(num_beams):
  prompts, mask = np.array([[9, 10, 0], [3, 4, 5]], np.int32), np.array([[1, 1, 0], [1, 1, 1]], bool)
  search = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  if num_beams:
    tokens, _ = generate.beam_search(CountingDecoder(stop=11), {}, prompts, mask, num_beams=num_beams,
                                     **search)
  else:
    tokens = generate.greedy_search(CountingDecoder(stop=11), {}, prompts, mask, **search)
  np.testing.assert_array_equal(tokens, [[11, EOS, PAD, PAD, PAD, PAD], [6, 7, 8, 9, 10, 11]])


def test_bad_settings_give_clear_errors(params):
  with pytest.raises(ValueError, match="min_new_tokens=9 must be in"):
    generate.greedy_search(DECODER, params, PROMPTS, MASK, **dict(SEARCH, min_new_tokens=9))
  with pytest.raises(ValueError, match="early_stopping must be"):
    generate.beam_search(DECODER, params, PROMPTS, MASK, num_beams=2, early_stopping="sometimes",
                         **SEARCH)


# Sampling and streaming.

@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (1.0, 1, 0.9), (2.0, 3, 0.05)])
def test_sampling_logits_are_transformers_warpers(temperature, top_k, top_p):
  logits = 3 * np.random.default_rng(top_k).normal(size=(4, 50)).astype(np.float32)
  warpers = [transformers.TemperatureLogitsWarper(temperature)]
  warpers += [transformers.TopKLogitsWarper(top_k)] if top_k else []
  warpers += [transformers.TopPLogitsWarper(top_p)] if top_p < 1 else []
  theirs = torch.from_numpy(logits)
  for warper in warpers:
    theirs = warper(None, theirs)
  ours = np.asarray(generate.sampling_logits(jnp.asarray(logits),
                                             generate.Sampling(temperature, top_k, top_p)))
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs.numpy()))
  np.testing.assert_allclose(ours[np.isfinite(ours)], theirs.numpy()[np.isfinite(ours)], rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class FixedLogits:
  """A fake model whose every prediction is the same distribution."""

  logits: tuple[float, ...]

  def init_cache(self, batch, max_length):
    return _Last(jnp.zeros((batch,), jnp.int32))

  def prefill(self, params, tokens, attention_mask, cache, context):
    return jnp.broadcast_to(jnp.asarray(self.logits), tokens.shape + (len(self.logits),)), cache

  def step(self, params, tokens, cache, context):
    return self.prefill(params, tokens, None, cache, context)


def test_samples_follow_the_warped_distribution():
  logits = (2.0, 1.0, 0.5, 0.0, -1.0, -3.0)
  prompts = np.ones((4000, 1), np.int32)
  sampling = generate.Sampling(temperature=0.8, top_k=4, top_p=0.9)
  tokens = np.asarray(generate.sample(FixedLogits(logits), {}, prompts, sampling=sampling,
                                      max_new_tokens=2, eos_id=99, pad_id=0))
  expected = np.asarray(jax.nn.softmax(generate.sampling_logits(jnp.asarray(logits), sampling)))
  assert expected[3:].sum() == 0 and expected[2] > 0  # top-p cut off token 3, top-k 4 and 5
  for column in tokens.T:  # every step draws afresh: the same frequencies
    frequencies = np.bincount(column, minlength=len(logits)) / len(column)
    np.testing.assert_allclose(frequencies, expected, atol=0.03)
  assert (tokens[:, 0] != tokens[:, 1]).mean() > 0.3


def test_sampling_is_seeded_and_top_k_one_is_greedy(params):
  greedy = generate.greedy_search(DECODER, params, PROMPTS, MASK, **SEARCH)
  top_1 = generate.sample(DECODER, params, PROMPTS, MASK, sampling=generate.Sampling(top_k=1),
                          seed=3, **SEARCH)
  np.testing.assert_array_equal(top_1, greedy)
  hot = functools.partial(generate.sample, DECODER, params, PROMPTS, MASK,
                          sampling=generate.Sampling(temperature=5.0), **SEARCH)
  np.testing.assert_array_equal(hot(seed=7), hot(seed=7))
  assert (np.asarray(hot(seed=7)) != np.asarray(hot(seed=8))).any()
  with pytest.raises(ValueError, match="top_p must be in"):
    generate.sample(DECODER, params, PROMPTS, MASK, sampling=generate.Sampling(top_p=0.0), **SEARCH)


def test_stream_yields_the_searches_tokens_and_compiles_each_step_once(params):
  greedy = np.asarray(generate.greedy_search(DECODER, params, PROMPTS, MASK, **SEARCH))
  streamed = np.stack(list(generate.stream(DECODER, params, PROMPTS, MASK, **SEARCH)), axis=1)
  np.testing.assert_array_equal(streamed, greedy[:, :streamed.shape[1]])
  assert (greedy[:, streamed.shape[1]:] == PAD).all()
  sampling = generate.Sampling(temperature=5.0, top_p=0.9)
  compiled = generate._jitted_advance._cache_size()
  streamed = list(generate.stream(DECODER, params, PROMPTS[::-1], MASK[::-1], sampling=sampling,
                                  seed=4, **SEARCH))
  sampled = generate.sample(DECODER, params, PROMPTS[::-1], MASK[::-1], sampling=sampling, seed=4,
                            **SEARCH)
  np.testing.assert_array_equal(np.stack(streamed, axis=1), sampled)
  assert len(streamed) == SEARCH["max_new_tokens"]  # the hot rows never say EOS this early
  assert generate._jitted_advance._cache_size() == compiled + 1  # sampling's step, once
