"""Chat templates (spec 4.4; chat families spec 5): conversation checks, rendering, and tokens
with assistant-only labels.

A conversation is a list of (role, text) turns, roles "human" / "gpt" alternating from "human",
optionally preceded by one "system" turn. Rendering produces segments: text (tokenized piece by
piece, as the reference tokenizes the parts around special tokens), special tokens (by id), and
the one image slot. Only assistant answers and the end marker that closes them carry labels.

Templates, with {sys} the system message and q / a the turns of each round:
  vicuna_v1:       <s>{sys} USER: q ASSISTANT: a</s>USER: q ASSISTANT: a</s>...
  plain:           <s><image>a\n  (LLaVA pre-training: the human text is dropped, only the image
                   placeholder is kept; every answer ends with a newline)
and the official `conversation.py` MPT style, system + sep, then role + text + sep per message:
  internlm2-chat:  <s><|im_start|>system\n{sys}<|im_end|><|im_start|>user\nq<|im_end|>
                   <|im_start|>assistant\na<|im_end|>...
  Hermes-2:        as internlm2-chat without <s> (the official MPT preprocessor adds none)
  phi3-chat:       <s><|system|>\n{sys}<|end|><|user|>\nq<|end|><|assistant|>\na<|end|>...
  internvl2_5:     <s><|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\nq<|im_end|>\n
                   <|im_start|>assistant\na<|im_end|>\n...  (the newline after an answer's
                   <|im_end|> is not trained)
<s> is the tokenizer's BOS and is left out when the tokenizer has none (Qwen2), as the official
preprocessors only keep the BOS their tokenizer adds.
"""

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from internvl_jax.data import issues
from internvl_jax.data import tokenizer as tokenizer_lib

IMAGE_PLACEHOLDER = "<image>"
HUMAN, ASSISTANT, SYSTEM = "human", "gpt", "system"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PHI3_SYSTEM, PHI3_USER = "<|system|>", "<|user|>"
PHI3_ASSISTANT, PHI3_END = "<|assistant|>", "<|end|>"
BOS, EOS = "<s>", "</s>"  # markers naming the tokenizer's BOS and EOS, whatever its pieces

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
INTERNLM2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                    "是一个有用无害的人工智能助手。")
INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合"
                      "开发的多模态大语言模型。")


@dataclasses.dataclass(frozen=True)
class Mpt:
  """The official `conversation.py` MPT style: `system.format(sys) + sep`, then `role + text +
  sep` per message; an open assistant turn ends with the bare role."""

  system: str  # the system message's wrapper, "{}" where the message goes
  user: str
  assistant: str
  sep: str  # starts with the template's stop token; what follows it (a newline) is not trained


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  default_system: str
  special_tokens: tuple[str, ...]  # pieces the tokenizer must hold whole
  stop: str  # the token that ends an answer, where generation stops (the official sep.strip())
  bos: bool = True  # the conversation starts with the tokenizer's BOS, if it has one
  mpt: Mpt | None = None  # None: vicuna_v1 and plain, rendered by hand


_CHATML = Mpt(IM_START + "system\n{}", IM_START + "user\n", IM_START + "assistant\n", IM_END)
_CHATML_TOKENS = (IM_START, IM_END)

TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, (), EOS),
    "internlm2-chat": Template("internlm2-chat", INTERNLM2_SYSTEM, _CHATML_TOKENS, IM_END,
                               mpt=_CHATML),
    "Hermes-2": Template("Hermes-2", INTERNLM2_SYSTEM, _CHATML_TOKENS, IM_END, bos=False,
                         mpt=_CHATML),
    "phi3-chat": Template(
        "phi3-chat", INTERNLM2_SYSTEM, (PHI3_SYSTEM, PHI3_USER, PHI3_ASSISTANT, PHI3_END),
        PHI3_END, mpt=Mpt(PHI3_SYSTEM + "\n{}", PHI3_USER + "\n", PHI3_ASSISTANT + "\n",
                          PHI3_END)),
    "internvl2_5": Template("internvl2_5", INTERNVL2_5_SYSTEM, _CHATML_TOKENS, IM_END,
                           mpt=dataclasses.replace(_CHATML, sep=IM_END + "\n")),
    "plain": Template("plain", "", (), EOS),
}

# Segment kinds.
TEXT, TOKEN, IMAGE = "text", "token", "image"


@dataclasses.dataclass(frozen=True)
class Segment:
  kind: str  # TEXT, TOKEN or IMAGE
  value: str = ""  # the text, or the special token
  trainable: bool = False


@dataclasses.dataclass(frozen=True)
class Conversation:
  system: str | None  # from a leading "system" turn; None uses the template's default
  rounds: tuple[tuple[str, str], ...]  # (question, answer)


def parse_conversation(turns: Sequence[tuple[str, str]], has_image: bool) -> Conversation:
  """Checks a conversation; raises `issues.SkipRecord` with the reason it cannot be used.

  A record with an image needs exactly one placeholder, in a human turn; a record without one
  must have none. A trailing question without an answer is dropped (it has nothing to learn).
  """
  turns = list(turns)
  system = None
  if turns and turns[0][0] == SYSTEM:
    system = turns.pop(0)[1]
  if not any(role == ASSISTANT for role, _ in turns):
    raise issues.SkipRecord(issues.CONVERSATION_NO_ASSISTANT_TURN)
  for i, (role, text) in enumerate(turns):
    expected = HUMAN if i % 2 == 0 else ASSISTANT
    if role != expected:
      raise issues.SkipRecord(issues.CONVERSATION_MALFORMED,
                              f"turn {i} is {role!r}, expected {expected!r}")
    if not text.strip():
      raise issues.SkipRecord(issues.CONVERSATION_MALFORMED, f"turn {i} is empty")
    if role == ASSISTANT and IMAGE_PLACEHOLDER in text:
      raise issues.SkipRecord(issues.CONVERSATION_MALFORMED, "image placeholder in an answer")
  placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
  if has_image and placeholders == 0:
    raise issues.SkipRecord(issues.CONVERSATION_NO_IMAGE_PLACEHOLDER)
  if has_image and placeholders > 1:
    raise issues.SkipRecord(issues.CONVERSATION_MULTIPLE_IMAGE_PLACEHOLDERS,
                            f"{placeholders} placeholders")
  if not has_image and placeholders:
    raise issues.SkipRecord(issues.IMAGE_MISSING, "placeholder without an image")
  rounds = tuple((turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2))
  return Conversation(system, rounds)


def _split(text: str, special_tokens: Sequence[str], trainable: bool = False) -> list[Segment]:
  """`text` as segments: the special tokens and the image slot cut out, the rest text."""
  pattern = "(" + "|".join(re.escape(t) for t in (IMAGE_PLACEHOLDER, *special_tokens)) + ")"
  segments = []
  for part in re.split(pattern, text):
    if part == IMAGE_PLACEHOLDER:
      segments.append(Segment(IMAGE))
    elif part in special_tokens:
      segments.append(Segment(TOKEN, part, trainable))
    elif part:
      segments.append(Segment(TEXT, part, trainable))
  return segments


def _render(template: str, system: str | None, system_message: str | None,
            turns: Sequence[tuple[str, str | None]]) -> list[Segment]:
  """Segments of (question, answer) turns; an answer None leaves the assistant's turn open (the
  last turn only). `system` is the data's system turn, which overrides `system_message`, which
  overrides the template's default."""
  if template not in TEMPLATES:
    raise ValueError(f"Unknown template {template!r}; known: {tuple(TEMPLATES)}")
  spec = TEMPLATES[template]
  if system is None:
    system = spec.default_system if system_message is None else system_message
  segments = [Segment(TOKEN, BOS)] if spec.bos else []
  if spec.mpt is not None:
    mpt, split = spec.mpt, functools.partial(_split, special_tokens=spec.special_tokens)
    text = mpt.system.format(system) + mpt.sep
    for question, answer in turns:
      segments += split(text + mpt.user + question + mpt.sep + mpt.assistant)
      if answer is None:
        return segments
      segments += split(answer + spec.stop, trainable=True)
      text = mpt.sep.removeprefix(spec.stop)  # the untrained rest of the separator
    return segments + split(text)
  if template == "vicuna_v1":
    if system:
      segments.append(Segment(TEXT, system))
    for question, answer in turns:
      segments += _split("USER: " + question + " ASSISTANT:", ())
      if answer is not None:
        segments += [Segment(TEXT, answer, True), Segment(TOKEN, spec.stop, True)]
  else:  # plain
    for question, answer in turns:
      if IMAGE_PLACEHOLDER in question:
        segments.append(Segment(IMAGE))
      if answer is not None:
        segments.append(Segment(TEXT, answer + "\n", True))
  return segments


def render(template: str, conversation: Conversation,
           system_message: str | None = None) -> list[Segment]:
  """Segments of a conversation; `system_message` overrides the template's default, and a
  system turn in the data overrides both."""
  return _render(template, conversation.system, system_message, conversation.rounds)


def prompt_segments(template: str, question: str, system_message: str | None = None) -> list[Segment]:
  """Segments of a one-question conversation up to where the assistant's answer starts: the
  prompt that chat generation continues."""
  return _render(template, None, system_message, ((question, None),))


def _token_id(token: str, tokenizer: tokenizer_lib.ChatTokenizer) -> int:
  return tokenizer.eos_id if token == EOS else tokenizer.token_id(token)


def stop_id(template: str, tokenizer: tokenizer_lib.ChatTokenizer) -> int:
  """The id that ends an answer: where generation stops (the official chat()'s eos_token_id)."""
  return _token_id(TEMPLATES[template].stop, tokenizer)


def _segment_ids(segment: Segment, tokenizer: tokenizer_lib.ChatTokenizer,
                 image_token_ids: Sequence[int]) -> list[int]:
  if segment.kind == TEXT:
    return tokenizer.encode(segment.value)
  if segment.kind == TOKEN:
    if segment.value == BOS:  # only a tokenizer that has a BOS starts with it
      return [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [_token_id(segment.value, tokenizer)]
  return list(image_token_ids)


def prompt_ids(segments: Sequence[Segment], tokenizer: tokenizer_lib.ChatTokenizer,
               image_token_ids: Sequence[int]) -> list[int]:
  """The token ids of prompt segments (see `prompt_segments`), image slot filled."""
  return [i for segment in segments for i in _segment_ids(segment, tokenizer, image_token_ids)]


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  tokens: np.ndarray  # int32 [max_len], right-padded with PAD_ID
  labels: np.ndarray  # int32 [max_len], IGNORE_LABEL outside assistant answers
  length: int  # tokens before padding
  truncated: bool


def tokenize(segments: Sequence[Segment], tokenizer: tokenizer_lib.ChatTokenizer,
             image_token_ids: Sequence[int], max_len: int) -> TokenizedConversation:
  """Tokens and labels of rendered segments, the image slot filled with `image_token_ids`.

  Over-long conversations are cut at `max_len`, but never inside the image tokens: if those do
  not fit with at least one labelled token after them the record is skipped.
  """
  tokens, labels = [], []
  image_end = 0
  for segment in segments:
    ids = _segment_ids(segment, tokenizer, image_token_ids)
    tokens += ids
    labels += ids if segment.trainable else [tokenizer_lib.IGNORE_LABEL] * len(ids)
    if segment.kind == IMAGE:
      image_end = len(tokens)
  truncated = len(tokens) > max_len
  if truncated:
    if image_end >= max_len:
      raise issues.SkipRecord(issues.CONVERSATION_TOO_LONG,
                              f"image tokens end at {image_end}, max_len {max_len}")
    tokens, labels = tokens[:max_len], labels[:max_len]
  if all(label == tokenizer_lib.IGNORE_LABEL for label in labels[image_end:]):
    raise issues.SkipRecord(issues.CONVERSATION_TOO_LONG,
                            "no answer token fits in max_len")
  length = len(tokens)
  out_tokens = np.full(max_len, tokenizer_lib.PAD_ID, np.int32)
  out_labels = np.full(max_len, tokenizer_lib.IGNORE_LABEL, np.int32)
  out_tokens[:length], out_labels[:length] = tokens, labels
  return TokenizedConversation(out_tokens, out_labels, length, truncated)
