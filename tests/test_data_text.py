"""Tokenizer conventions (spec 2.1, 4.2) and chat templates with assistant-only labels (4.4)."""

import pickle

import numpy as np
import pytest
from sentencepiece import SentencePieceProcessor

from internvl_jax.data import chat
from internvl_jax.data import demo
from internvl_jax.data import issues
from internvl_jax.data import templates
from internvl_jax.data import tokenizer as tokenizer_lib

IGNORE = tokenizer_lib.IGNORE_LABEL


@pytest.fixture(scope="module")
def model_proto() -> bytes:
  return tokenizer_lib.train_sentencepiece(demo.tokenizer_corpus(seed=0, train_size=300), 400)


@pytest.fixture(scope="module")
def tokenizer(model_proto) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.Tokenizer(model_proto)


def test_trained_model_has_llama_id_layout(tokenizer):
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)


def test_encode_caption_prefix_bos_eos_and_padding(tokenizer):
  ids, truncated = tokenizer.encode_caption("a red circle", max_len=80)
  assert not truncated and ids.dtype == np.int32 and ids.shape == (80,)
  length = int((ids > 0).sum())
  assert ids[0] == 1 and ids[length - 1] == 2 and not ids[length:].any()
  assert list(ids[1:length - 1]) == tokenizer.encode("summarize:a red circle")


def test_encode_caption_truncation_keeps_eos(tokenizer):
  ids, truncated = tokenizer.encode_caption("a red circle " * 50, max_len=12)
  assert truncated and ids[0] == 1 and ids[-1] == 2 and (ids > 0).all()
  assert list(ids[1:-1]) == tokenizer.encode("summarize:" + "a red circle " * 50)[:10]


def test_itg_labels_mask_prefix_and_padding(tokenizer):
  ids, labels, truncated = tokenizer.encode_prefixed_target("English caption:", "a blue star", 40)
  prefix = [1, *tokenizer.encode("English caption:")]
  target = [*tokenizer.encode("a blue star"), 2]
  assert not truncated
  assert list(ids[:len(prefix) + len(target)]) == prefix + target
  assert list(labels[:len(prefix)]) == [IGNORE] * len(prefix)
  assert list(labels[len(prefix):len(prefix) + len(target)]) == target
  assert (labels[len(prefix) + len(target):] == IGNORE).all()


def test_special_tokens_are_appended_without_moving_existing_ids(model_proto):
  original = SentencePieceProcessor(model_proto=model_proto)
  extended = tokenizer_lib.Tokenizer(model_proto, tokenizer_lib.IMAGE_TOKENS + ("<img>",))
  size = original.vocab_size()
  assert extended.vocab_size == size + 3
  assert [extended.token_id(t) for t in tokenizer_lib.IMAGE_TOKENS] == [size, size + 1, size + 2]
  assert all(extended._sp.id_to_piece(i) == original.id_to_piece(i) for i in range(size))
  text = "a red circle in the top left"
  assert extended.encode(text) == original.encode(text)
  assert extended._sp.encode("x<IMG_CONTEXT>y").count(size + 2) == 1  # matched whole


def test_tokenizer_survives_pickling(model_proto):
  extended = tokenizer_lib.Tokenizer(model_proto, tokenizer_lib.IMAGE_TOKENS)
  restored = pickle.loads(pickle.dumps(extended))
  assert restored.vocab_size == extended.vocab_size
  assert restored.token_id(tokenizer_lib.IMAGE_CONTEXT) == extended.token_id(tokenizer_lib.IMAGE_CONTEXT)


TURNS = [("human", "<image>\nWhat shape is shown?"), ("gpt", "A circle."),
         ("human", "What colour is it?"), ("gpt", "It is red.")]


def chat_tokenizer(model_proto, template):
  special = tokenizer_lib.IMAGE_TOKENS + templates.TEMPLATES[template].special_tokens
  return tokenizer_lib.Tokenizer(model_proto, special)


def tokenize(model_proto, template, max_len=200, tiles=2, turns=TURNS):
  tokenizer = chat_tokenizer(model_proto, template)
  conversation = templates.parse_conversation(turns, has_image=True)
  segments = templates.render(template, conversation, system_message="Be brief.")
  image_ids = chat.image_token_ids(tokenizer, tiles, tokens_per_tile=4, wrap=True)
  return tokenizer, templates.tokenize(segments, tokenizer, image_ids, max_len)


@pytest.mark.parametrize("template, answer_ends", [
    ("vicuna_v1", lambda tok: [tok.eos_id]),
    ("internlm2-chat", lambda tok: [tok.token_id(templates.IM_END)]),
    ("plain", lambda tok: []),
])
def test_labels_cover_exactly_the_answers(model_proto, template, answer_ends):
  tok, out = tokenize(model_proto, template)
  end = answer_ends(tok)
  if template == "plain":
    expected = tok.encode("A circle.\n") + tok.encode("It is red.\n")
  else:
    expected = tok.encode("A circle.") + end + tok.encode("It is red.") + end
  labelled = out.labels[out.labels != IGNORE]
  assert list(labelled) == expected
  trained = out.labels != IGNORE
  np.testing.assert_array_equal(out.tokens[trained], out.labels[trained])
  assert out.tokens[0] == tok.bos_id and not out.truncated
  assert (out.tokens[out.length:] == tokenizer_lib.PAD_ID).all()


@pytest.mark.parametrize("template", sorted(templates.TEMPLATES))
def test_image_placeholder_becomes_wrapped_context_tokens(model_proto, template):
  tok, out = tokenize(model_proto, template, tiles=3)
  tokens = list(out.tokens[:out.length])
  start = tokens.index(tok.token_id(tokenizer_lib.IMAGE_START))
  context = tok.token_id(tokenizer_lib.IMAGE_CONTEXT)
  assert tokens[start + 1:start + 13] == [context] * 12
  assert tokens[start + 13] == tok.token_id(tokenizer_lib.IMAGE_END)
  assert tokens.count(context) == 12
  assert (out.labels[start:start + 14] == IGNORE).all()


def test_vicuna_and_internlm2_render_the_reference_layout(model_proto):
  conversation = templates.parse_conversation(TURNS[:2], has_image=True)
  vicuna = templates.render("vicuna_v1", conversation)
  text = "".join(s.value if s.kind == templates.TEXT else f"[{s.kind}:{s.value}]" for s in vicuna)
  assert text == ("[token:<s>]" + templates.VICUNA_SYSTEM + "USER: [image:]\nWhat shape is shown? "
                  "ASSISTANT:A circle.[token:</s>]")
  internlm = templates.render("internlm2-chat", conversation, system_message="S")
  text = "".join(s.value if s.kind == templates.TEXT else s.value or "<image>" for s in internlm)
  assert text == ("<s><|im_start|>system\nS<|im_end|><|im_start|>user\n<image>\nWhat shape is "
                  "shown?<|im_end|><|im_start|>assistant\nA circle.<|im_end|>")


def test_truncation_never_cuts_the_image_tokens(model_proto):
  tok, full = tokenize(model_proto, "vicuna_v1")
  tokens = list(full.tokens[:full.length])
  image_end = tokens.index(tok.token_id(tokenizer_lib.IMAGE_END)) + 1
  # Room for the image and part of the first answer: truncated after the image.
  first_label = int(np.argmax(full.labels != IGNORE))
  _, cut = tokenize(model_proto, "vicuna_v1", max_len=first_label + 2)
  assert cut.truncated and cut.length == first_label + 2
  np.testing.assert_array_equal(cut.tokens, full.tokens[:first_label + 2])
  # The image does not fit, or nothing to learn fits after it: skipped, never cut.
  for max_len in (image_end - 3, image_end, first_label):
    with pytest.raises(issues.SkipRecord) as error:
      tokenize(model_proto, "vicuna_v1", max_len=max_len)
    assert error.value.reason == issues.CONVERSATION_TOO_LONG


@pytest.mark.parametrize("turns, has_image, reason", [
    ([("human", "What?"), ("gpt", "A circle.")], True, issues.CONVERSATION_NO_IMAGE_PLACEHOLDER),
    ([("human", "<image> and <image>"), ("gpt", "Two.")], True,
     issues.CONVERSATION_MULTIPLE_IMAGE_PLACEHOLDERS),
    ([("human", "<image>\nWhat?")], True, issues.CONVERSATION_NO_ASSISTANT_TURN),
    ([("gpt", "Hi."), ("human", "<image>")], True, issues.CONVERSATION_MALFORMED),
    ([("human", "<image>"), ("gpt", "  ")], True, issues.CONVERSATION_MALFORMED),
    ([("human", "<image>\nWhat?"), ("gpt", "A circle.")], False, issues.IMAGE_MISSING),
])
def test_bad_conversations_are_skipped_by_reason(turns, has_image, reason):
  with pytest.raises(issues.SkipRecord) as error:
    templates.parse_conversation(turns, has_image)
  assert error.value.reason == reason


def test_system_turn_and_trailing_question():
  turns = [("system", "Sys."), ("human", "Hi"), ("gpt", "Hello."), ("human", "Bye?")]
  conversation = templates.parse_conversation(turns, has_image=False)
  assert conversation.system == "Sys." and conversation.rounds == (("Hi", "Hello."),)
