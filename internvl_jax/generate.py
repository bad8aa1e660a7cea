"""Greedy, sampled and beam-search decoding over a KV cache, compiled once per shape.

The search is model-agnostic: it needs a `Decoder`, which allocates a cache, runs the prompt
(`prefill`) and then one token per row per step (`step`). LLaMA's decoder runs the same model for
both. QLLaMA captioning differs only in its prefill: the 96 queries and the prompt go through the
layers once, with cross-attention into the vision tokens; the steps then attend to the queries'
cached keys and values, so the vision features are used once, as in the reference. `context` (a
pytree of batch-leading arrays, e.g. vision features) reaches both functions and is repeated per
beam.

Greedy decoding and sampling are one loop (`_start`, then `_advance` until every row is done) that
differs only in how a token is chosen; `stream` runs the same two functions one step at a time
and yields the tokens as they come. Sampling applies transformers' temperature, top-k and top-p
warpers, with a key derived from the seed and the step.

Beam search follows transformers' vectorized `_beam_search` step by step (top 2k continuations,
length penalty on finished hypotheses, the `early_stopping` heuristics), so the same settings give
the same sequences. Outputs have a fixed length `max_new_tokens`, padded after EOS.
"""

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import LlamaConfig
from internvl_jax.models import llama

_NEG = -1.0e9  # transformers' "impossible" score; finite, so that arithmetic on it stays finite


class Decoder(Protocol):
  """What the search needs from a model. Implementations are hashable (they are static args)."""

  def init_cache(self, batch: int, max_length: int) -> Any:
    """An empty cache with a `take(rows)` method that gathers batch rows."""

  def prefill(self, params, tokens, attention_mask, cache, context) -> tuple[jax.Array, Any]:
    """Runs the prompt; returns (batch, length, vocab) logits and the cache."""

  def step(self, params, tokens, cache, context) -> tuple[jax.Array, Any]:
    """Runs one (batch, 1) token per row; returns (batch, 1, vocab) logits and the cache."""


@dataclasses.dataclass(frozen=True)
class LlamaDecoder:
  """LLaMA as a `Decoder`: the prompt and every step are the same model call on the cache."""

  config: LlamaConfig

  def init_cache(self, batch, max_length):
    return llama.init_cache(self.config, batch, max_length)

  def prefill(self, params, tokens, attention_mask, cache, context):
    del context
    out = llama.Llama(self.config).apply({"params": params}, tokens, attention_mask, cache=cache)
    return out.logits, out.cache

  def step(self, params, tokens, cache, context):
    return self.prefill(params, tokens, None, cache, context)


def _last_real_logits(logits, attention_mask):
  """Each row's logits at its last real prompt token (right or left padding)."""
  length = attention_mask.shape[1]
  last = jnp.max(jnp.where(attention_mask, jnp.arange(length), 0), axis=1)
  return logits[jnp.arange(logits.shape[0]), last]


def _forbid_early_eos(scores, step, min_new_tokens, eos_id):
  """transformers' MinNewTokensLengthLogitsProcessor: no EOS before `min_new_tokens` tokens."""
  blocked = scores.at[:, eos_id].set(-jnp.inf)
  return jnp.where(step < min_new_tokens, blocked, scores)


def _prefill(decoder, params, prompt, prompt_mask, context, max_new_tokens):
  batch, length = prompt.shape
  cache = decoder.init_cache(batch, length + max_new_tokens)
  logits, cache = decoder.prefill(params, prompt, prompt_mask, cache, context)
  return _last_real_logits(logits, prompt_mask).astype(jnp.float32), cache


def _checked(prompt, prompt_mask, max_new_tokens, min_new_tokens, num_beams=1):
  """Validates the settings (before tracing, so errors name values) and fills in the mask."""
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be integer ids of shape (batch, length); got {prompt.dtype} "
                     f"{prompt.shape}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"min_new_tokens={min_new_tokens} must be in [0, max_new_tokens={max_new_tokens}].")
  if num_beams < 1:
    raise ValueError(f"num_beams must be at least 1, got {num_beams}.")
  prompt_mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  if prompt_mask.shape != prompt.shape:
    raise ValueError(f"prompt_mask has shape {prompt_mask.shape}, prompt {prompt.shape}.")
  return prompt, prompt_mask, jnp.asarray(min_new_tokens, jnp.int32)


class Sampling(NamedTuple):
  """transformers' sampling warpers, applied in its order; traced, so that changing them does not
  recompile."""

  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1: no nucleus filter


def sampling_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """The logits divided by the temperature, -inf outside the top-k and outside the smallest set
  of best tokens whose probability reaches top_p (transformers' Temperature, TopK and TopP
  warpers: ties with the last kept token are kept, and the best token always is)."""
  logits = logits / sampling.temperature
  vocab = logits.shape[-1]
  rank = jnp.arange(vocab)
  top_k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
  descending = jnp.where(rank < top_k, -jnp.sort(-logits, axis=-1), -jnp.inf)
  probs = jax.nn.softmax(descending, axis=-1)
  better = jnp.cumsum(probs, axis=-1) - probs  # the probability of the tokens ranked above
  keep = (rank < top_k) & ((better < sampling.top_p) | (sampling.top_p >= 1) | (rank == 0))
  cutoff = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _checked_sampling(sampling: Sampling) -> Sampling:
  if not sampling.temperature > 0:
    raise ValueError(f"temperature must be positive, got {sampling.temperature}.")
  if sampling.top_k < 0:
    raise ValueError(f"top_k must be 0 (off) or positive, got {sampling.top_k}.")
  if not 0 < sampling.top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}.")
  return Sampling(jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
                  jnp.float32(sampling.top_p))


class _Decoding(NamedTuple):
  tokens: jax.Array  # (batch, max_new_tokens)
  done: jax.Array  # (batch,)
  step: jax.Array  # tokens chosen so far
  cache: Any


class _Settings(NamedTuple):
  """The traced settings of greedy and sampled decoding; `sampling` None is greedy."""

  min_new_tokens: jax.Array
  seed: jax.Array
  sampling: Sampling | None


def _choose(state: _Decoding, logits, settings: _Settings, eos_id, pad_id) -> _Decoding:
  """Appends each row's next token: the best, or one drawn from the warped distribution with a
  key from the seed and the step (the same seed gives the same tokens)."""
  logits = _forbid_early_eos(logits, state.step, settings.min_new_tokens, eos_id)
  if settings.sampling is None:
    token = jnp.argmax(logits, axis=-1)
  else:
    key = jax.random.fold_in(jax.random.key(settings.seed), state.step)
    token = jax.random.categorical(key, sampling_logits(logits, settings.sampling), axis=-1)
  token = jnp.where(state.done, pad_id, token).astype(jnp.int32)
  return state._replace(tokens=state.tokens.at[:, state.step].set(token),
                        done=state.done | (token == eos_id), step=state.step + 1)


def _start(decoder, params, prompt, prompt_mask, context, settings: _Settings, *, max_new_tokens,
           eos_id, pad_id) -> _Decoding:
  """The prompt's prefill and the first token."""
  logits, cache = _prefill(decoder, params, prompt, prompt_mask, context, max_new_tokens)
  batch = prompt.shape[0]
  state = _Decoding(jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                    jnp.zeros((batch,), bool), jnp.zeros((), jnp.int32), cache)
  return _choose(state, logits, settings, eos_id, pad_id)


def _advance(decoder, params, state: _Decoding, context, settings: _Settings, *, eos_id,
             pad_id) -> _Decoding:
  """One decoder step on the last tokens, and the next token."""
  logits, cache = decoder.step(params, state.tokens[:, state.step - 1, None], state.cache, context)
  return _choose(state._replace(cache=cache), logits[:, -1].astype(jnp.float32), settings, eos_id,
                 pad_id)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "eos_id", "pad_id"))
def _decode(decoder, params, prompt, prompt_mask, context, settings: _Settings, *, max_new_tokens,
            eos_id, pad_id):
  state = _start(decoder, params, prompt, prompt_mask, context, settings,
                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  advance = functools.partial(_advance, decoder, params, context=context, settings=settings,
                              eos_id=eos_id, pad_id=pad_id)
  state = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), advance,
                             state)
  return state.tokens


def _checked_decoding(prompt, prompt_mask, max_new_tokens, min_new_tokens, seed: int,
                      sampling: Sampling | None) -> tuple[jax.Array, jax.Array, _Settings]:
  prompt, prompt_mask, min_new_tokens = _checked(prompt, prompt_mask, max_new_tokens, min_new_tokens)
  sampling = None if sampling is None else _checked_sampling(sampling)
  return prompt, prompt_mask, _Settings(min_new_tokens, jnp.uint32(seed), sampling)


def greedy_search(decoder: Decoder, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
                  context=None, *, max_new_tokens: int, min_new_tokens: int = 0, eos_id: int,
                  pad_id: int) -> jax.Array:
  """(batch, max_new_tokens) greedy continuations of the (right- or left-padded) prompts.

  A row that has produced EOS is padded with `pad_id`; the loop ends when every row is done.
  Compiled once per decoder, shapes and `max_new_tokens`.
  """
  prompt, prompt_mask, settings = _checked_decoding(prompt, prompt_mask, max_new_tokens,
                                                    min_new_tokens, 0, None)
  return _decode(decoder, params, prompt, prompt_mask, context, settings,
                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def sample(decoder: Decoder, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
           context=None, *, sampling: Sampling = Sampling(), seed: int = 0, max_new_tokens: int,
           min_new_tokens: int = 0, eos_id: int, pad_id: int) -> jax.Array:
  """(batch, max_new_tokens) sampled continuations, as `greedy_search` but each token drawn from
  the `sampling`-warped distribution. Compiled once for all sampling settings and seeds."""
  prompt, prompt_mask, settings = _checked_decoding(prompt, prompt_mask, max_new_tokens,
                                                    min_new_tokens, seed, sampling)
  return _decode(decoder, params, prompt, prompt_mask, context, settings,
                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


_jitted_start = jax.jit(_start, static_argnames=("decoder", "max_new_tokens", "eos_id", "pad_id"))
# The state is donated: each step updates the cache in place rather than copying it.
_jitted_advance = jax.jit(_advance, static_argnames=("decoder", "eos_id", "pad_id"),
                          donate_argnames=("state",))


def stream(decoder: Decoder, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
           context=None, *, sampling: Sampling | None = None, seed: int = 0, max_new_tokens: int,
           min_new_tokens: int = 0, eos_id: int, pad_id: int) -> Iterator[np.ndarray]:
  """Yields each step's (batch,) tokens as soon as they are chosen: greedy (`sampling` None) or
  sampled, the same tokens `greedy_search` / `sample` return, until every row is done or
  `max_new_tokens` are out. The prefill and the step are each compiled once per shapes; the loop
  over steps is Python's, so that a consumer gets each token before the next step runs."""
  prompt, prompt_mask, settings = _checked_decoding(prompt, prompt_mask, max_new_tokens,
                                                    min_new_tokens, seed, sampling)
  search = dict(eos_id=eos_id, pad_id=pad_id)
  state = _jitted_start(decoder, params, prompt, prompt_mask, context, settings,
                        max_new_tokens=max_new_tokens, **search)
  for step in range(max_new_tokens):
    tokens, done = jax.device_get((state.tokens[:, step], state.done))
    yield tokens
    if done.all() or step + 1 == max_new_tokens:
      return
    state = _jitted_advance(decoder, params, state, context, settings, **search)


def _gather_beams(x, beams):
  """x[b, beams[b, i]] for (batch, beams, ...) arrays."""
  return jnp.take_along_axis(x, beams.reshape(beams.shape + (1,) * (x.ndim - 2)), axis=1)


class _Beams(NamedTuple):
  live: jax.Array  # (batch, beams, max_new_tokens): the beams still running
  live_scores: jax.Array  # (batch, beams) summed log-probabilities
  hypotheses: jax.Array  # (batch, beams, max_new_tokens): the best finished sequences
  scores: jax.Array  # (batch, beams) their length-penalized scores
  finished: jax.Array  # (batch, beams): whether a hypothesis slot holds a finished sequence
  improvable: jax.Array  # (batch, 1): a live beam may still beat the worst hypothesis
  go_on: jax.Array  # () the loop's condition besides the length
  step: jax.Array
  cache: Any


def beam_search(decoder: Decoder, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
                context=None, *, num_beams: int, max_new_tokens: int, min_new_tokens: int = 0,
                eos_id: int, pad_id: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> tuple[jax.Array, jax.Array]:
  """The best beam per prompt: (batch, max_new_tokens) tokens padded after EOS, and its score.

  The score is the sum of the token log-probabilities divided by (generated length)**
  `length_penalty`, as transformers' `sequences_scores`; `early_stopping` is True, False or
  "never" with transformers' meaning.
  """
  prompt, prompt_mask, min_new_tokens = _checked(prompt, prompt_mask, max_new_tokens,
                                                 min_new_tokens, num_beams)
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
  return _beam_search(decoder, params, prompt, prompt_mask, context, min_new_tokens,
                      num_beams=num_beams, max_new_tokens=max_new_tokens, eos_id=eos_id,
                      pad_id=pad_id, length_penalty=float(length_penalty),
                      early_stopping=early_stopping)


@functools.partial(jax.jit, static_argnames=("decoder", "num_beams", "max_new_tokens", "eos_id",
                                             "pad_id", "length_penalty", "early_stopping"))
def _beam_search(decoder, params, prompt, prompt_mask, context, min_new_tokens, *, num_beams,
                 max_new_tokens, eos_id, pad_id, length_penalty, early_stopping):
  batch, k, n = prompt.shape[0], num_beams, max_new_tokens
  logits, cache = _prefill(decoder, params, prompt, prompt_mask, context, max_new_tokens)
  rows = jnp.repeat(jnp.arange(batch), k)
  logits, cache = logits[rows], cache.take(rows)
  context = jax.tree.map(lambda x: x[rows], context)

  def choose(state: _Beams, logits) -> _Beams:
    step, vocab = state.step, logits.shape[-1]
    log_probs = _forbid_early_eos(jax.nn.log_softmax(logits), step, min_new_tokens, eos_id)
    log_probs = log_probs.reshape(batch, k, vocab) + state.live_scores[:, :, None]
    # The top 2k continuations over all beams: even if k of them end here, k can go on.
    top_scores, top = jax.lax.top_k(log_probs.reshape(batch, k * vocab), 2 * k)
    source, token = top // vocab, (top % vocab).astype(jnp.int32)
    candidates = _gather_beams(state.live, source).at[:, :, step].set(token)
    ends = (token == eos_id) | (step + 1 >= n)

    live_scores = top_scores + ends * _NEG
    keep = jax.lax.top_k(live_scores, k)[1]
    rows = jnp.arange(batch)[:, None] * k + _gather_beams(source, keep)
    cache = state.cache.take(rows.reshape(-1))

    # Only the k best candidates may become hypotheses; the others are live-beam backups.
    finishing = ends & (jnp.arange(2 * k) < k)
    scores = top_scores / (step + 1).astype(jnp.float32)**length_penalty
    if early_stopping is True:
      scores += jnp.all(state.finished, axis=1, keepdims=True) * _NEG
    scores += (~state.improvable) * _NEG + (~finishing) * _NEG
    best = jax.lax.top_k(jnp.concatenate([state.scores, scores], axis=1), k)[1]
    merge = lambda old, new: _gather_beams(jnp.concatenate([old, new], axis=1), best)
    state = state._replace(
        live=_gather_beams(candidates, keep), live_scores=_gather_beams(live_scores, keep),
        hypotheses=merge(state.hypotheses, candidates), scores=merge(state.scores, scores),
        finished=merge(state.finished, finishing), step=step + 1, cache=cache)

    # transformers' heuristic for whether the best live beam can still beat the worst hypothesis.
    length = n if early_stopping == "never" and length_penalty > 0 else state.step
    best_live = state.live_scores[:, :1] / jnp.asarray(length, jnp.float32)**length_penalty
    worst = jnp.where(state.finished, jnp.min(state.scores, axis=1, keepdims=True), _NEG)
    improvable = state.improvable & jnp.any(best_live > worst, axis=1, keepdims=True)
    go_on = jnp.any(improvable) & ~jnp.all(ends)
    if early_stopping is True:
      go_on &= ~jnp.all(state.finished)
    return state._replace(improvable=improvable, go_on=go_on)

  def advance(state: _Beams) -> _Beams:
    last = state.live[:, :, state.step - 1].reshape(-1, 1)
    logits, cache = decoder.step(params, last, state.cache, context)
    return choose(state._replace(cache=cache), logits[:, -1].astype(jnp.float32))

  empty = jnp.full((batch, k, n), pad_id, jnp.int32)
  # Only the first beam starts live, so that the k beams do not all pick the same tokens.
  state = _Beams(empty, jnp.zeros((batch, k)).at[:, 1:].set(_NEG), empty, jnp.full((batch, k), _NEG),
                 jnp.zeros((batch, k), bool), jnp.ones((batch, 1), bool), jnp.array(True),
                 jnp.zeros((), jnp.int32), cache)
  state = jax.lax.while_loop(lambda s: (s.step < n) & s.go_on, advance, choose(state, logits))
  return state.hypotheses[:, 0], state.scores[:, 0]
