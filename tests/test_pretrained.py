"""The public API on an InternVL-14B-shaped checkpoint: load_pretrained from the official PyTorch
layout and from Orbax, image and text embeddings, tokenization, and the command lines."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import internvl_jax
from internvl_jax import caption
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.convert.pytorch import TOKENIZER_FILE, export_pytorch
from internvl_jax.data.tokenizer import Tokenizer, train_sentencepiece
from internvl_jax.models.internvl import InternVLG, init_params
from scripts import REPO
from test_convert import assert_trees_equal

CONFIG = internvl_preset("tiny", vision=vision_preset("tiny", hidden_size=48, mlp_dim=96),
                         text=llama_preset("tiny", vocab_size=400))
CAPTIONS = ["a photo of a red circle", "a blue square on grass", "two green triangles",
            "a yellow star in the sky", "a purple heart"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An official-layout InternVLModel directory with random weights and a tokenizer.model."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32),
                        init_params(CONFIG))
  directory = tmp_path_factory.mktemp("internvl_14b_tiny")
  export_pytorch(CONFIG, params, str(directory), layout="official", strict=False)
  (directory / TOKENIZER_FILE).write_bytes(train_sentencepiece(CAPTIONS, vocab_size=400))
  return params, directory


def test_embeddings_from_the_official_layout(checkpoint):
  params, directory = checkpoint
  model = internvl_jax.load_pretrained(str(directory))
  assert model.config == CONFIG and model.tokenizer is not None
  pixels = internvl_jax.normalize_images(
      np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
  for mode in ("C", "G"):
    image = model.encode_image(pixels, mode=mode)
    expected = InternVLG(CONFIG).apply({"params": params}, pixels, mode=mode, method=InternVLG.encode_image)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert image.shape == (2, CONFIG.embed_dim)
  text = model.encode_text(["a red circle", "a blue square"])
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)

  # Strings go through the reference's tokenization: "summarize:" + text, BOS, EOS, pad 0.
  tokenizer = Tokenizer.load(str(directory / TOKENIZER_FILE))
  ids = [tokenizer.bos_id, *tokenizer.encode("summarize:a red circle"), tokenizer.eos_id]
  input_ids = np.zeros((1, 80), np.int32)
  input_ids[0, :len(ids)] = ids
  by_ids = model.encode_text(input_ids=input_ids, attention_mask=input_ids > 0)
  np.testing.assert_allclose(by_ids[0], text[0], atol=1e-6)
  expected = InternVLG(CONFIG).apply({"params": params}, jnp.asarray(input_ids), jnp.asarray(input_ids > 0),
                                     method=InternVLG.encode_text)
  np.testing.assert_allclose(by_ids, expected, atol=1e-6)
  assert model.vision_features(pixels, layer=-2).shape == (2, 17, 48)


def test_caption_decodes_beam_search_with_the_reference_prompt(checkpoint):
  params, directory = checkpoint
  model = internvl_jax.load_pretrained(str(directory))
  pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  captions = model.caption(pixels, num_beams=2, min_new_tokens=3, max_new_tokens=6)
  prompt = [[model.tokenizer.bos_id, *model.tokenizer.encode("English caption:")]]
  ids, _ = caption.caption(CONFIG, params, pixels, np.asarray(prompt), num_beams=2,
                           min_new_tokens=3, max_new_tokens=6)
  eos = model.tokenizer.eos_id
  expected = [model.tokenizer.decode(row[:list(row).index(eos)] if eos in row else row)
              for row in np.asarray(ids)]
  assert captions == expected and len(captions) == 2


def test_bad_api_calls_say_what_to_do(checkpoint):
  model = internvl_jax.load_pretrained(str(checkpoint[1]))
  with pytest.raises(ValueError, match="either texts or input_ids"):
    model.encode_text()
  with pytest.raises(ValueError, match="need their attention_mask"):
    model.encode_text(input_ids=np.ones((1, 4), np.int32))
  with pytest.raises(ValueError, match="mode must be 'C' or 'G'"):
    model.encode_image(np.zeros((1, 32, 32, 3), np.float32), mode="X")


def test_command_lines_stream_internvl_both_ways(checkpoint, tmp_path):
  params, directory = checkpoint
  run = lambda tool, *args: subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                                           capture_output=True, text=True, cwd=REPO)
  result = run("convert_from_pytorch.py", "--src", str(directory), "--out", str(tmp_path / "orbax"))
  assert result.returncode == 0, result.stderr
  model = internvl_jax.load_pretrained(str(tmp_path / "orbax"))
  assert model.tokenizer is not None
  assert_trees_equal(params, jax.tree.map(np.asarray, model.params))
  # The official code cannot load tiny widths, so the command line refuses them by name.
  result = run("convert_to_pytorch.py", "--checkpoint", str(tmp_path / "orbax"), "--out",
               str(tmp_path / "back"), "--format", "official")
  assert result.returncode == 2 and "vision width 48 (official: 3200)" in result.stderr
  result = run("convert_to_pytorch.py", "--checkpoint", str(tmp_path / "orbax"), "--out",
               str(tmp_path / "back"), "--format", "transformers")
  assert result.returncode == 2 and "has no 'transformers' PyTorch format" in result.stderr
