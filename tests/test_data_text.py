"""Tokenizer conventions (spec 2.1, 4.2) and chat templates with assistant-only labels (4.4)."""

import json
import pickle

import numpy as np
import pytest
import tokenizers
from sentencepiece import SentencePieceProcessor

from internvl_jax.data import chat
from internvl_jax.data import config as config_lib
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
    ("Hermes-2", lambda tok: [tok.token_id(templates.IM_END)]),
    ("phi3-chat", lambda tok: [tok.token_id(templates.PHI3_END)]),
    # The newline after each <|im_end|> is not trained.
    ("internvl2_5", lambda tok: [tok.token_id(templates.IM_END)]),
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
  # Hermes-2's official preprocessor adds no BOS; the others keep the tokenizer's.
  assert (out.tokens[0] == tok.bos_id) == (template != "Hermes-2") and not out.truncated
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


def _prompt_text(segments) -> str:
  return "".join(s.value if s.kind != templates.IMAGE else templates.IMAGE_PLACEHOLDER
                 for s in segments)


INTERNLM2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                    "是一个有用无害的人工智能助手。")
INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                      "联合开发的多模态大语言模型。")
CHATML = "<|im_start|>system\n{S}<|im_end|><|im_start|>user\n{Q}<|im_end|><|im_start|>assistant\n"


@pytest.mark.parametrize("template, system, prompt", [  # chat families spec 5
    ("internlm2-chat", INTERNLM2_SYSTEM, "<s>" + CHATML),
    ("Hermes-2", INTERNLM2_SYSTEM, CHATML),
    ("phi3-chat", INTERNLM2_SYSTEM, "<s><|system|>\n{S}<|end|><|user|>\n{Q}<|end|><|assistant|>\n"),
    ("internvl2_5", INTERNVL2_5_SYSTEM, "<s><|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n"
                                         "{Q}<|im_end|>\n<|im_start|>assistant\n"),
])
def test_prompts_are_the_official_renderings(template, system, prompt):
  question = "<image>\nWhat shape is shown?"
  segments = templates.prompt_segments(template, question)
  assert _prompt_text(segments) == prompt.format(S=system, Q=question)
  segments = templates.prompt_segments(template, question, system_message="")
  assert _prompt_text(segments) == prompt.format(S="", Q=question)


@pytest.mark.parametrize("template, stop", [
    ("vicuna_v1", "</s>"), ("plain", "</s>"), ("internlm2-chat", "<|im_end|>"),
    ("Hermes-2", "<|im_end|>"), ("phi3-chat", "<|end|>"), ("internvl2_5", "<|im_end|>")])
def test_stop_ids_are_the_official_sep_stripped(model_proto, template, stop):
  tok = chat_tokenizer(model_proto, template)
  expected = tok.eos_id if stop == "</s>" else tok._sp.piece_to_id(stop)
  assert templates.stop_id(template, tok) == expected


def test_data_config_accepts_every_template():
  assert config_lib.TEMPLATES == tuple(templates.TEMPLATES)
  loader = config_lib.LoaderConfig(sources=(config_lib.Source("x"),), global_batch_size=1)
  for template in ("Hermes-2", "phi3-chat", "internvl2_5"):
    assert config_lib.ChatDataConfig(loader, "t.model", template=template).template == template
  with pytest.raises(ValueError, match="template='chatml' is not one of"):
    config_lib.ChatDataConfig(loader, "t.model", template="chatml")


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_bpe(bos: str | None = None) -> str:
  """A byte-level BPE tokenizer.json in Qwen2's manner (no BOS unless `bos` names one that the
  post-processor puts in front, as LLaMA-style tokenizer.json files do)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=QWEN_SPECIALS + ([bos] if bos else []),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(demo.tokenizer_corpus(seed=0, train_size=100), trainer)
  if bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
  return tok.to_str()


@pytest.fixture(scope="module")
def bpe_json() -> str:
  return train_bpe()


def test_json_tokenizer_appends_special_tokens_and_has_no_bos(bpe_json):
  original = tokenizers.Tokenizer.from_str(bpe_json)
  size = original.get_vocab_size(with_added_tokens=True)
  tok = tokenizer_lib.JsonTokenizer(bpe_json, "<|im_end|>",
                                    tokenizer_lib.IMAGE_TOKENS + ("<|im_end|>",))
  assert tok.vocab_size == size + 3 and tok.bos_id is None
  assert [tok.token_id(t) for t in tokenizer_lib.IMAGE_TOKENS] == [size, size + 1, size + 2]
  assert tok.eos_id == original.token_to_id("<|im_end|>")
  text = "a red circle in the top left"
  assert tok.encode(text) == original.encode(text).ids
  ids = tok.encode("x<IMG_CONTEXT>y!")
  assert ids.count(size + 2) == 1 and tok.decode(ids) == "x<IMG_CONTEXT>y!"
  assert tok.decode([0]) == "<|endoftext|>"  # id 0 is a token, not padding to drop
  with pytest.raises(KeyError, match="'<quad>' is not in the vocabulary"):
    tok.token_id("<quad>")
  restored = pickle.loads(pickle.dumps(tok))
  assert (restored.vocab_size, restored.eos_id, restored.encode("x<img>")) == (
      tok.vocab_size, tok.eos_id, tok.encode("x<img>"))


def test_json_tokenizer_bos_is_what_its_post_processor_adds():
  tok = tokenizer_lib.JsonTokenizer(train_bpe(bos="<s>"), "<|endoftext|>")
  assert tok.bos_id == tok.token_id("<s>") and tok.bos_id not in tok.encode("a red circle")


@pytest.mark.parametrize("template", ["Hermes-2", "internvl2_5", "internlm2-chat"])
def test_json_tokenizer_conversations_render_the_official_text(bpe_json, tmp_path, template):
  path = tmp_path / "tokenizer.json"
  path.write_text(bpe_json)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  tok = chat.load_chat_tokenizer(str(path), template)
  conversation = templates.parse_conversation(TURNS, has_image=True)
  segments = templates.render(template, conversation, system_message="Be brief.")
  image_ids = chat.image_token_ids(tok, 1, tokens_per_tile=2, wrap=True)
  out = templates.tokenize(segments, tok, image_ids, max_len=200)
  sep = "<|im_end|>\n" if template == "internvl2_5" else "<|im_end|>"
  image = "<img>" + "<IMG_CONTEXT>" * 2 + "</img>"
  official = (f"<|im_start|>system\nBe brief.{sep}<|im_start|>user\n{image}\nWhat shape is shown?"
              f"{sep}<|im_start|>assistant\nA circle.{sep}<|im_start|>user\nWhat colour is it?{sep}"
              f"<|im_start|>assistant\nIt is red.{sep}")
  assert tok.decode(out.tokens[:out.length]) == official  # no BOS: the tokenizer has none
  end = [tok.token_id("<|im_end|>")]
  assert list(out.labels[out.labels != IGNORE]) == (tok.encode("A circle.") + end +
                                                    tok.encode("It is red.") + end)


def test_load_reads_the_eos_from_tokenizer_config(bpe_json, tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text(bpe_json)
  with pytest.raises(ValueError, match="does not name its EOS"):
    tokenizer_lib.load(str(path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<|endoftext|>", "special": True}}))
  tok = tokenizer_lib.load(str(path), tokenizer_lib.IMAGE_TOKENS)
  assert tok.eos_id == tok.token_id("<|endoftext|>") and tok.token_id("<img>") >= 0
