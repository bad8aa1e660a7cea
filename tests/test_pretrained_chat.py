"""chat() on an InternVL-Chat checkpoint in the transformers layout: template prompt, image
tokens, greedy answer, and the errors that say what is wrong."""

import jax
import numpy as np
import pytest

import internvl_jax
from internvl_jax import generate
from internvl_jax.config import chat_preset, llama_preset
from internvl_jax.convert.pytorch import TOKENIZER_FILE, export_pytorch
from internvl_jax.data import chat as chat_data
from internvl_jax.data import templates
from internvl_jax.data.tokenizer import IMAGE_CONTEXT, Tokenizer, train_sentencepiece
from internvl_jax.models.chat import ChatDecoder, init_params

TEXTS = ["what colour is the circle", "the circle is red", "how many squares are there",
         "there are two squares", "a photo of a star"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  proto = train_sentencepiece(TEXTS, vocab_size=300)
  tokenizer = Tokenizer(proto, ("<img>", "</img>", IMAGE_CONTEXT))
  config = chat_preset("tiny-v1.5", llm=llama_preset("tiny", vocab_size=tokenizer.vocab_size),
                       image_context_id=tokenizer.token_id(IMAGE_CONTEXT))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32), init_params(config))
  directory = tmp_path_factory.mktemp("chat")
  export_pytorch(config, params, str(directory), layout="transformers")
  (directory / TOKENIZER_FILE).write_bytes(proto)  # the plain LLaMA-style model, as released
  return config, params, tokenizer, directory


def test_chat_answers_greedily_from_the_template_prompt(checkpoint):
  config, params, tokenizer, directory = checkpoint
  model = internvl_jax.load_pretrained(str(directory))
  assert model.config == config
  tiles = np.random.default_rng(1).normal(size=(2, config.image_size, config.image_size, 3)).astype(np.float32)
  answer = model.chat(tiles, "what colour is the circle", max_new_tokens=5)
  assert isinstance(answer, str)

  image_ids = chat_data.image_token_ids(tokenizer, 2, config.num_image_tokens, wrap=True)
  segments = templates.prompt_segments("vicuna_v1", "<image>\nwhat colour is the circle")
  ids = templates.prompt_ids(segments, tokenizer, image_ids)
  assert ids.count(config.image_context_id) == 2 * config.num_image_tokens
  assert tokenizer.decode(ids).endswith("ASSISTANT:")
  expected = generate.greedy_search(
      ChatDecoder(config), params, np.asarray([ids]), None,
      {"tiles": tiles[None], "tile_count": np.asarray([2])}, max_new_tokens=5,
      eos_id=tokenizer.eos_id, pad_id=0)[0]
  expected = list(np.asarray(expected))
  expected = expected[:expected.index(tokenizer.eos_id)] if tokenizer.eos_id in expected else expected
  assert answer == tokenizer.decode(expected)


def test_chat_errors_say_what_is_wrong(checkpoint, tmp_path):
  config, params, tokenizer, directory = checkpoint
  model = internvl_jax.load_pretrained(str(directory))
  with pytest.raises(ValueError, match="image_context|do not belong together"):
    mismatched = internvl_jax.Pretrained(config.replace(image_context_id=5), model.params, model.tokenizer)
    mismatched.chat(np.zeros((1, 32, 32, 3), np.float32), "hi")
  with pytest.raises(ValueError, match="needs an InternVL-Chat model"):
    internvl_jax.Pretrained(config.vision, model.params["vision_model"]).chat(np.zeros((1, 32, 32, 3)), "hi")
