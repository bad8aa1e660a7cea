"""Tokenizers with InternVL's text conventions (spec 2.1, 4.2, 4.4c; chat families spec 1.3).

`Tokenizer` loads a SentencePiece `tokenizer.model` (LLaMA, InternLM2, or the small demo model);
`JsonTokenizer` a transformers `tokenizer.json` (Qwen2 / Qwen2.5, Phi-3). Both can append special
tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`, template markers) at the end of the vocabulary, so the
ids of existing tokens never change and the new ones are matched whole; `load` picks one by the
file. Chat code needs only what `ChatTokenizer` names.
"""

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
IMAGE_TOKENS = (IMAGE_START, IMAGE_END, IMAGE_CONTEXT)
PAD_ID = 0  # LLaMA has no pad piece; InternVL pads with 0 (the unk id) and masks ids > 0.
IGNORE_LABEL = -100  # label of positions that carry no loss


class ChatTokenizer(Protocol):
  """What templates and chat code use of a tokenizer. `bos_id` is None for a tokenizer that puts
  no BOS in front of a text (Qwen2)."""

  vocab_size: int
  bos_id: int | None
  eos_id: int

  def token_id(self, piece: str) -> int:
    ...

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


def add_special_tokens(model_proto: bytes, tokens: Sequence[str]) -> bytes:
  """Appends `tokens` missing from the vocabulary as user-defined pieces, in order."""
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(model_proto)
  existing = {piece.piece for piece in model.pieces}
  for token in tokens:
    if token in existing:
      continue
    piece = model.pieces.add()
    piece.piece = token
    piece.score = 0.0
    piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    existing.add(token)
  return model.SerializeToString()


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> bytes:
  """Trains a model with LLaMA's id layout and normalization; returns the serialized model.

  unk=0, bos=1, eos=2, no pad piece; byte fallback, so no text maps to unk (which is also the
  pad id); identity normalization and kept whitespace, as in LLaMA's tokenizer.model.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      byte_fallback=True,
      split_digits=True,
      character_coverage=1.0,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      hard_vocab_limit=False,  # small corpora cannot always fill the requested size
      num_threads=1,  # one thread keeps training deterministic
      minloglevel=2,
  )
  return model.getvalue()


class Tokenizer:
  """SentencePiece with BOS/EOS/pad conventions and the encodings the pipelines need."""

  def __init__(self, model_proto: bytes, special_tokens: Sequence[str] = ()):
    if special_tokens:
      model_proto = add_special_tokens(model_proto, special_tokens)
    self._model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError("The SentencePiece model has no BOS or EOS piece; InternVL needs both.")

  @classmethod
  def load(cls, path: str, special_tokens: Sequence[str] = ()) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read(), special_tokens)

  def __getstate__(self):
    return {"model_proto": self._model_proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def model_proto(self) -> bytes:
    return self._model_proto

  def token_id(self, piece: str) -> int:
    """Id of a whole piece (e.g. a special token); raises if the vocabulary lacks it."""
    token = self._sp.piece_to_id(piece)
    if token == self._sp.unk_id() and piece != self._sp.id_to_piece(token):
      raise KeyError(f"{piece!r} is not in the vocabulary; add it as a special token.")
    return token

  def encode(self, text: str) -> list[int]:
    """Pieces of `text`, without BOS or EOS."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i != PAD_ID])

  def encode_caption(self, text: str, max_len: int,
                     prefix: str = "summarize:") -> tuple[np.ndarray, bool]:
    """BOS + prefix+text (no space between) + EOS, right-padded with 0 to `max_len`.

    Over-long texts are cut before the EOS, which is kept: the text feature is read at the EOS.
    Returns the int32 ids and whether the text was truncated.
    """
    ids = [self.bos_id, *self.encode(prefix + text), self.eos_id]
    truncated = len(ids) > max_len
    if truncated:
      ids = ids[:max_len - 1] + [self.eos_id]
    return _pad(ids, max_len, PAD_ID), truncated

  def encode_prefixed_target(self, prefix: str, text: str,
                             max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """ITG input: BOS + prefix, then text + EOS; labels only on the text and its EOS.

    As in the reference the two parts are tokenized separately (the prefix without EOS, the
    text without BOS). Labels are aligned with the ids (the loss shifts them); the prefix and
    padding are IGNORE_LABEL. Returns ids, labels and whether the text was truncated.
    """
    prefix_ids = [self.bos_id, *self.encode(prefix)]
    target_ids = [*self.encode(text), self.eos_id]
    room = max_len - len(prefix_ids)
    if room < 2:
      raise ValueError(f"max_len {max_len} leaves no room after the prefix {prefix!r}.")
    truncated = len(target_ids) > room
    if truncated:
      target_ids = target_ids[:room - 1] + [self.eos_id]
    ids = prefix_ids + target_ids
    labels = [IGNORE_LABEL] * len(prefix_ids) + target_ids
    return _pad(ids, max_len, PAD_ID), _pad(labels, max_len, IGNORE_LABEL), truncated


def _pad(ids: list[int], length: int, value: int) -> np.ndarray:
  out = np.full(length, value, np.int32)
  out[:len(ids)] = ids
  return out


class JsonTokenizer:
  """A transformers `tokenizer.json` (HF `tokenizers`), with the `ChatTokenizer` interface.

  Its BOS is the special token its post-processor puts in front of a text (as `tokenizer(text)`
  adds it in the official preprocessors), None if it puts none (Qwen2). tokenizer.json does not
  say which token is the EOS: `eos_token` names it (tokenizer_config.json's, see `load`).
  """

  def __init__(self, json_str: str, eos_token: str, special_tokens: Sequence[str] = ()):
    self._tokenizer = tokenizers.Tokenizer.from_str(json_str)
    if special_tokens:  # appended in order; tokens already in the vocabulary keep their ids
      self._tokenizer.add_special_tokens(
          [tokenizers.AddedToken(t, special=True, normalized=False) for t in special_tokens])
    self._eos_token = eos_token
    self._eos_id = self.token_id(eos_token)
    probe = self._tokenizer.encode("a")
    self._bos_id = probe.ids[0] if probe.special_tokens_mask[0] else None

  def __getstate__(self):
    return {"json_str": self._tokenizer.to_str(), "eos_token": self._eos_token}

  def __setstate__(self, state):
    self.__init__(state["json_str"], state["eos_token"])

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def token_id(self, piece: str) -> int:
    """Id of a whole token (e.g. a special token); raises if the vocabulary lacks it."""
    token = self._tokenizer.token_to_id(piece)
    if token is None:
      raise KeyError(f"{piece!r} is not in the vocabulary; add it as a special token.")
    return token

  def encode(self, text: str) -> list[int]:
    """Tokens of `text`, without the post-processor's BOS or EOS."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`, special tokens included (every id is a token: there is no pad id to
    drop, unlike SentencePiece's 0)."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load(path: str, special_tokens: Sequence[str] = ()) -> Tokenizer | JsonTokenizer:
  """The tokenizer in `path`: a `tokenizer.json` (its EOS named by the tokenizer_config.json next
  to it), else a SentencePiece model."""
  if not path.endswith(".json"):
    return Tokenizer.load(path, special_tokens)
  config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
  eos = None
  if os.path.exists(config_path):
    with open(config_path) as f:
      eos = json.load(f).get("eos_token")
  if eos is None:
    raise ValueError(f"{path}: tokenizer.json does not name its EOS; put the tokenizer_config.json "
                     "that does (eos_token) next to it.")
  with open(path) as f:
    return JsonTokenizer(f.read(), eos["content"] if isinstance(eos, dict) else eos, special_tokens)
