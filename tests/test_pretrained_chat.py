"""Chat on an InternVL-Chat checkpoint in the transformers layout: image features and logits (the
model's and transformers'), batched chat in the checkpoint's template with dynamic tiles and one
compile per length bucket, sampling, streaming, tools/chat.py, and the errors that say what is
wrong."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import internvl_jax
from internvl_jax import generate
from internvl_jax.config import chat_preset, llama_preset
from internvl_jax.convert.pytorch import TOKENIZER_FILE, export_pytorch
from internvl_jax.data import chat as chat_data
from internvl_jax.data import templates, tiling, transforms
from internvl_jax.data.tokenizer import IMAGE_CONTEXT, Tokenizer, train_sentencepiece
from internvl_jax.models.chat import ChatDecoder, InternVLChat, init_params
from internvl_jax.pretrained import MIN_PROMPT_BUCKET, bucket

TEXTS = ["what colour is the circle", "the circle is red", "how many squares are there",
         "there are two squares", "a photo of a star"] * 20
QUESTION = "what colour is the circle"
TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "chat.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  proto = train_sentencepiece(TEXTS, vocab_size=300)
  tokenizer = Tokenizer(proto, ("<img>", "</img>", IMAGE_CONTEXT))
  config = chat_preset("tiny-v1.5", llm=llama_preset("tiny", vocab_size=tokenizer.vocab_size),
                       image_context_id=tokenizer.token_id(IMAGE_CONTEXT), template="vicuna_v1",
                       dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=4)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), init_params(config))
  directory = tmp_path_factory.mktemp("chat")
  export_pytorch(config, params, str(directory), layout="transformers")
  (directory / TOKENIZER_FILE).write_bytes(proto)  # the plain LLaMA-style model, as released
  return config, params, tokenizer, directory


@pytest.fixture(scope="module")
def model(checkpoint):
  return internvl_jax.load_pretrained(str(checkpoint[3]))


def _tiles(config, count: int, seed: int = 1) -> np.ndarray:
  size = config.image_size
  return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype(np.float32)


def _image(seed: int, width: int, height: int) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return Image.fromarray(pixels)


def test_image_features_and_chat_logits_are_the_models_and_transformers(checkpoint, model):
  config, params, tokenizer, directory = checkpoint
  n = config.num_image_tokens
  tiles = _tiles(config, 3).reshape(3, 1, config.image_size, config.image_size, 3)
  features = model.image_features(tiles[:, 0])
  expected = jax.jit(lambda p, t: InternVLChat(config).apply(
      {"params": p}, t, method=InternVLChat.encode_tiles))(params, tiles[:, 0])
  assert features.shape == (3, n, config.llm.hidden_size)
  np.testing.assert_allclose(features, expected, atol=1e-6)

  # Two right-padded rows: two tiles, then one tile in two slots; text around the images.
  rows = [[1, 17, *[config.image_context_id] * (2 * n), 30, 99, 4],
          [1, *[config.image_context_id] * n, 5, 6]]
  ids = np.zeros((2, len(rows[0])), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  slots = np.stack([tiles[:2, 0], np.concatenate([tiles[2], np.zeros_like(tiles[2])])])
  counts, mask = np.array([2, 1]), ids != 0
  logits = model.chat_logits(slots, counts, ids, mask)
  assert logits.shape == (2, ids.shape[1], config.llm.vocab_size) and logits.dtype == np.float32
  ours = jax.jit(lambda p, *x: InternVLChat(config).apply({"params": p}, *x))(
      params, slots, counts, ids, mask)
  np.testing.assert_allclose(logits, ours, atol=1e-6)
  reference = transformers.InternVLForConditionalGeneration.from_pretrained(
      str(directory), attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = reference(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long(),
                       pixel_values=torch.from_numpy(tiles[:, 0].transpose(0, 3, 1, 2).copy())
                       ).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits)[mask], theirs[mask], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"row 1: 4 tokens, 8 features"):
    model.chat_logits(slots, np.array([2, 2]), ids, mask)


def test_chat_answers_greedily_from_the_configs_template_prompt(checkpoint, model):
  config, params, tokenizer, _ = checkpoint
  tiles = _tiles(config, 2)
  answer, = model.chat([tiles], [QUESTION], max_new_tokens=5)
  image_ids = chat_data.image_token_ids(tokenizer, 2, config.num_image_tokens, wrap=True)
  ids = templates.prompt_ids(templates.prompt_segments("vicuna_v1", f"<image>\n{QUESTION}"),
                             tokenizer, image_ids)
  assert ids.count(config.image_context_id) == 2 * config.num_image_tokens
  assert tokenizer.decode(ids).endswith("ASSISTANT:")
  expected = generate.greedy_search(
      ChatDecoder(config), params, np.asarray([ids]), None,
      {"tiles": tiles[None], "tile_count": np.asarray([2])}, max_new_tokens=5,
      eos_id=tokenizer.eos_id, pad_id=0)[0]
  expected = list(np.asarray(expected))
  expected = expected[:expected.index(tokenizer.eos_id)] if tokenizer.eos_id in expected else expected
  assert answer == tokenizer.decode(expected)


def test_images_are_tiled_as_the_config_says(checkpoint, model):
  config = checkpoint[0]
  image = _image(0, 70, 30)  # wide: a 2x1 grid and the thumbnail
  tiles = tiling.tile_image(image, config.image_size, 1, 4, use_thumbnail=True)
  assert len(tiles) == 3
  expected = np.stack([transforms.to_normalized_array(tile) for tile in tiles])
  np.testing.assert_array_equal(model._tiles(image), expected)
  np.testing.assert_array_equal(model._tiles(np.asarray(image)), expected)
  np.testing.assert_array_equal(model._tiles(expected[0]), expected[:1])
  resized = internvl_jax.Pretrained(config.replace(dynamic_image_size=False), model.params,
                                    model.tokenizer)._tiles(image.convert("L"))
  np.testing.assert_array_equal(resized, transforms.to_normalized_array(
      transforms.resize(image.convert("L").convert("RGB"), config.image_size))[None])


def test_chat_batches_prompts_of_one_bucket_in_one_compile(checkpoint, model):
  config = checkpoint[0]
  questions = [["what colour is the circle", "how many squares are there"],
               ["a star", "there are two squares and a circle"],
               ["red", "what colour is the star in the photo"]]
  images = [_image(1, 70, 30), _tiles(config, 1)]  # three tiles and one: both in 4 slots
  batches = [model._chat_batch(images, pair, None, None) for pair in questions]
  lengths = {int(length) for batch in batches for length in batch.mask.sum(axis=1)}
  assert len(lengths) == 6 and {batch.prompt.shape for batch in batches} == {
      (2, bucket(max(lengths), MIN_PROMPT_BUCKET))}
  assert {batch.context["tiles"].shape[1] for batch in batches} == {4}
  before = generate._decode._cache_size()
  answers = [model.chat(images, pair, max_new_tokens=6) for pair in questions]
  assert generate._decode._cache_size() == before + 1
  # Padding and batching change no answer: each is the one asked alone.
  for pair, batched in zip(questions[:2], answers):
    alone = [model.chat([image], [question], max_new_tokens=6)[0]
             for image, question in zip(images, pair)]
    assert batched == alone
  # A longer prompt goes to the next bucket: one more compile.
  compiled = generate._decode._cache_size()
  model.chat(images, ["circle " * max(lengths), "star"], max_new_tokens=6)
  assert generate._decode._cache_size() == compiled + 1


def test_sampling_is_seeded_and_top_k_one_is_greedy(checkpoint, model):
  images, questions = [_tiles(checkpoint[0], 1), _image(2, 40, 40)], [QUESTION, "a star"]
  greedy = model.chat(images, questions, max_new_tokens=6)
  assert model.chat(images, questions, max_new_tokens=6, do_sample=True, top_k=1, seed=5) == greedy
  hot = lambda seed: model.chat(images, questions, max_new_tokens=6, do_sample=True,
                                temperature=5.0, top_p=0.95, seed=seed)
  assert hot(1) == hot(1) and hot(1) != hot(2)


def test_stream_chat_yields_the_answer_as_it_comes(checkpoint, model):
  image = _image(3, 50, 20)
  pieces = list(model.stream_chat(image, QUESTION, max_new_tokens=8))
  answer, = model.chat([image], [QUESTION], max_new_tokens=8)
  assert answer and len(pieces) > 1 and "".join(pieces) == answer
  sampled = model.stream_chat(image, QUESTION, max_new_tokens=8, do_sample=True, temperature=3.0,
                              seed=4)
  assert "".join(sampled) == model.chat([image], [QUESTION], max_new_tokens=8, do_sample=True,
                                        temperature=3.0, seed=4)[0]


def test_tool_prints_the_streamed_greedy_answer(checkpoint, model, tmp_path):
  path = str(tmp_path / "image.png")
  _image(4, 60, 40).save(path)
  question = "how many squares are there"
  result = subprocess.run(
      [sys.executable, TOOL, "--checkpoint", str(checkpoint[3]), "--image", path, "--question",
       question, "--max-new-tokens", "8"], capture_output=True, text=True, check=True)
  answer, = model.chat([Image.open(path)], [question], max_new_tokens=8)
  assert answer and result.stdout == answer + "\n"


def test_chat_errors_say_what_is_wrong(checkpoint, model):
  config = checkpoint[0]
  tiles = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="do not belong together"):
    internvl_jax.Pretrained(config.replace(image_context_id=5), model.params,
                            model.tokenizer).chat([tiles], ["hi"])
  with pytest.raises(ValueError, match="needs an InternVL-Chat model"):
    internvl_jax.Pretrained(config.vision, model.params["vision_model"]).chat([tiles], ["hi"])
  unnamed = internvl_jax.Pretrained(config.replace(template=None), model.params, model.tokenizer)
  with pytest.raises(ValueError, match=r"names no chat template \(config.template\); pass"):
    unnamed.chat([tiles], ["hi"])
  assert unnamed.chat([tiles], ["hi"], template="vicuna_v1", max_new_tokens=3) == model.chat(
      [tiles], ["hi"], max_new_tokens=3)
  with pytest.raises(ValueError, match="internlm2-chat template's tokens .* past the model's"):
    model.chat([tiles], ["hi"], template="internlm2-chat")
  with pytest.raises(ValueError, match="Unknown chat template 'chatml'"):
    model.chat([tiles], ["hi"], template="chatml")
  with pytest.raises(ValueError, match="one image per question; got 1 images and 2 questions"):
    model.chat([tiles], ["hi", "ho"])
  with pytest.raises(ValueError, match=r"Ready tiles must be \(tiles, 32, 32, 3\)"):
    model.chat([np.zeros((2, 16, 16, 3), np.float32)], ["hi"])
  with pytest.raises(ValueError, match="needs an InternVL-Chat model"):
    internvl_jax.Pretrained(config.vision, model.params["vision_model"]).image_features(tiles)
