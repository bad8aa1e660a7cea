"""Chat templates (spec 4.4): conversation checks, rendering, and tokens with assistant-only labels.

A conversation is a list of (role, text) turns, roles "human" / "gpt" alternating from "human",
optionally preceded by one "system" turn. Rendering produces segments: text (tokenized piece by
piece, as the reference tokenizes the parts around special tokens), special tokens (by id), and
the one image slot. Only assistant answers and the separator that ends them carry labels.

Templates, with {sys} the system message and q / a the turns of each round:
  vicuna_v1:       <s>{sys} USER: q ASSISTANT: a</s>USER: q ASSISTANT: a</s>...
  internlm2-chat:  <s><|im_start|>system\n{sys}<|im_end|><|im_start|>user\nq<|im_end|>
                   <|im_start|>assistant\na<|im_end|>...
  plain:           <s><image>a\n  (LLaVA pre-training: the human text is dropped, only the image
                   placeholder is kept; every answer ends with a newline)
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from internvl_jax.data import issues
from internvl_jax.data import tokenizer as tokenizer_lib

IMAGE_PLACEHOLDER = "<image>"
HUMAN, ASSISTANT, SYSTEM = "human", "gpt", "system"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
INTERNLM2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                    "是一个有用无害的人工智能助手。")


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  default_system: str
  special_tokens: tuple[str, ...]  # pieces the tokenizer must hold whole


TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, ()),
    "internlm2-chat": Template("internlm2-chat", INTERNLM2_SYSTEM, (IM_START, IM_END)),
    "plain": Template("plain", "", ()),
}

# Segment kinds.
TEXT, TOKEN, IMAGE = "text", "token", "image"
BOS, EOS = "<s>", "</s>"  # TOKEN segments naming the tokenizer's BOS and EOS


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


def _question_segments(text: str, prefix: str = "", suffix: str = "") -> list[Segment]:
  """prefix + text + suffix as untrainable text, with the image slot where the placeholder is."""
  before, found, after = (prefix + text + suffix).partition(IMAGE_PLACEHOLDER)
  segments = [Segment(TEXT, before)] if before else []
  if found:
    segments.append(Segment(IMAGE))
    if after:
      segments.append(Segment(TEXT, after))
  return segments


def render(template: str, conversation: Conversation,
           system_message: str | None = None) -> list[Segment]:
  """Segments of a conversation; `system_message` overrides the template's default, and a
  system turn in the data overrides both."""
  spec = TEMPLATES[template]
  system = conversation.system
  if system is None:
    system = spec.default_system if system_message is None else system_message
  segments = [Segment(TOKEN, BOS)]
  if template == "vicuna_v1":
    if system:
      segments.append(Segment(TEXT, system))
    for question, answer in conversation.rounds:
      segments += _question_segments(question, "USER: ", " ASSISTANT:")
      segments += [Segment(TEXT, answer, True), Segment(TOKEN, EOS, True)]
  elif template == "internlm2-chat":
    if system:
      segments += [Segment(TOKEN, IM_START), Segment(TEXT, "system\n" + system),
                   Segment(TOKEN, IM_END)]
    for question, answer in conversation.rounds:
      segments.append(Segment(TOKEN, IM_START))
      segments += _question_segments(question, "user\n")
      segments += [Segment(TOKEN, IM_END), Segment(TOKEN, IM_START),
                   Segment(TEXT, "assistant\n"), Segment(TEXT, answer, True),
                   Segment(TOKEN, IM_END, True)]
  elif template == "plain":
    for question, answer in conversation.rounds:
      if IMAGE_PLACEHOLDER in question:
        segments.append(Segment(IMAGE))
      segments.append(Segment(TEXT, answer + "\n", True))
  else:
    raise ValueError(f"Unknown template {template!r}; known: {tuple(TEMPLATES)}")
  return segments


def prompt_segments(template: str, question: str, system_message: str | None = None) -> list[Segment]:
  """Segments of a one-question conversation up to where the assistant's answer starts: the
  prompt that chat generation continues."""
  segments = render(template, Conversation(None, ((question, ""),)), system_message)
  while segments and segments[-1].trainable:  # the (empty) answer and its end marker
    segments.pop()
  return segments


def _segment_ids(segment: Segment, tokenizer: tokenizer_lib.Tokenizer,
                 image_token_ids: Sequence[int]) -> list[int]:
  if segment.kind == TEXT:
    return tokenizer.encode(segment.value)
  if segment.kind == TOKEN:
    return [tokenizer.bos_id if segment.value == BOS else
            tokenizer.eos_id if segment.value == EOS else tokenizer.token_id(segment.value)]
  return list(image_token_ids)


def prompt_ids(segments: Sequence[Segment], tokenizer: tokenizer_lib.Tokenizer,
               image_token_ids: Sequence[int]) -> list[int]:
  """The token ids of prompt segments (see `prompt_segments`), image slot filled."""
  return [i for segment in segments for i in _segment_ids(segment, tokenizer, image_token_ids)]


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  tokens: np.ndarray  # int32 [max_len], right-padded with PAD_ID
  labels: np.ndarray  # int32 [max_len], IGNORE_LABEL outside assistant answers
  length: int  # tokens before padding
  truncated: bool


def tokenize(segments: Sequence[Segment], tokenizer: tokenizer_lib.Tokenizer,
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
