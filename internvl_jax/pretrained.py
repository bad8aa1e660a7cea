"""The public entry point: `load_pretrained(path)` for PyTorch directories, Orbax checkpoints and
training workdirs."""

import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from internvl_jax import caption, generate, loading
from internvl_jax.config import ChatConfig, InternVLConfig, VisionConfig
from internvl_jax.convert import orbax_io
from internvl_jax.convert.pytorch import TOKENIZER_FILE
from internvl_jax.data import chat as chat_data
from internvl_jax.data import templates
from internvl_jax.data import tiling
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms
from internvl_jax.data.tokenizer import Tokenizer
from internvl_jax.models.intern_vit import InternViT, select_layer
from internvl_jax.models.chat import ChatDecoder, InternVLChat, check_inputs
from internvl_jax.models.internvl import InternVLC, InternVLG

TEXT_MAX_TOKENS = 80  # the reference's text length for contrastive use (spec 2.1)


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def _vision_features(config: VisionConfig, params, pixels, layer: int):
  output = InternViT(config).apply({"params": params}, pixels, return_hidden_states=layer != -1)
  return select_layer(output, layer)


@functools.partial(jax.jit, static_argnames=("config", "mode"))
def _encode_image(config: InternVLConfig, params, pixels, mode: str):
  if config.variant == "C":
    return InternVLC(config).apply({"params": params}, pixels, method=InternVLC.encode_image)
  return InternVLG(config).apply({"params": params}, pixels, mode=mode, method=InternVLG.encode_image)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_text(config: InternVLConfig, params, input_ids, attention_mask):
  model = InternVLC if config.variant == "C" else InternVLG
  return model(config).apply({"params": params}, input_ids, attention_mask,
                             method=model.encode_text)


MIN_PROMPT_BUCKET = 64  # the shortest padded chat prompt


def bucket(n: int, smallest: int = 1) -> int:
  """The smallest power of two >= n and >= smallest: padded shapes, so that inputs of nearby
  sizes share one compiled program (at most twice the work of the unpadded one)."""
  return max(smallest, 1 << (int(n) - 1).bit_length())


def _until(ids: list[int], stop: int) -> list[int]:
  return ids[:ids.index(stop)] if stop in ids else ids


class _ChatBatch(NamedTuple):
  tokenizer: Tokenizer  # with the image and template pieces
  stop: int  # the template's stop id
  prompt: np.ndarray  # (batch, length bucket) right-padded ids
  mask: np.ndarray  # (batch, length bucket) real tokens
  context: dict  # "tiles" (batch, tile bucket, size, size, 3), "tile_count" (batch,)


@functools.partial(jax.jit, static_argnames=("config",))
def _image_features(config: ChatConfig, params, pixels):
  return InternVLChat(config).apply({"params": params}, pixels, method=InternVLChat.encode_tiles)


@functools.partial(jax.jit, static_argnames=("config",))
def _chat_logits(config: ChatConfig, params, tiles, tile_counts, input_ids, attention_mask):
  return InternVLChat(config).apply({"params": params}, tiles, tile_counts, input_ids,
                                    attention_mask)


def _with_pieces(tokenizer: Tokenizer, pieces) -> Tokenizer:
  """The tokenizer with the special pieces it lacks appended (existing ids never change)."""
  missing = []
  for piece in pieces:
    try:
      tokenizer.token_id(piece)
    except KeyError:
      missing.append(piece)
  return Tokenizer(tokenizer.model_proto, missing) if missing else tokenizer


@dataclasses.dataclass
class Pretrained:
  """A loaded model: its config, its params, its tokenizer if it has one, and what it computes."""

  config: object  # VisionConfig (InternViT), InternVLConfig (InternVL-14B), ChatConfig, LlamaConfig
  params: dict
  tokenizer: Tokenizer | None = None

  def _vision(self) -> tuple[VisionConfig, dict]:
    if isinstance(self.config, VisionConfig):
      return self.config, self.params
    if isinstance(self.config, (InternVLConfig, ChatConfig)):
      return self.config.vision, self.params["vision_model"]
    raise ValueError(f"A {type(self.config).__name__} model has no vision tower.")

  def _internvl(self) -> InternVLConfig:
    if not isinstance(self.config, InternVLConfig):
      raise ValueError(f"Image and text embeddings need an InternVL model (InternVL-C/G); this is "
                       f"a {type(self.config).__name__}.")
    return self.config

  @property
  def is_internvl_c(self) -> bool:
    """True for InternVL-C params (stage 1): no QLLaMA, so no mode "G" and no captions."""
    return isinstance(self.config, InternVLConfig) and self.config.variant == "C"

  def _internvl_g(self, what: str) -> InternVLConfig:
    config = self._internvl()
    if config.variant == "C":
      raise ValueError(f"{what} needs InternVL-G (QLLaMA, stage 2); this is InternVL-C (stage 1, "
                       "a `text_model` text tower).")
    return config

  def vision_features(self, pixels, layer: int = -1) -> jax.Array:
    """InternViT token features (batch, 1 + patches, width) of the given layer.

    `pixels` are NHWC float32, normalized with the ImageNet mean and std. `layer` indexes the
    hidden states as the reference does: -1 is the last block, -4 the fourth-to-last.
    """
    config, params = self._vision()
    return _vision_features(config, params, jnp.asarray(pixels, jnp.float32), layer)

  def encode_image(self, pixels, mode: str = "C") -> jax.Array:
    """L2-normalized image embeddings (batch, embed_dim): InternVL-C ("C") or -G ("G")."""
    if mode not in ("C", "G"):
      raise ValueError(f"mode must be 'C' or 'G', got {mode!r}.")
    config = self._internvl_g('encode_image(mode="G")') if mode == "G" else self._internvl()
    return _encode_image(config, self.params, jnp.asarray(pixels, jnp.float32), mode)

  def encode_text(self, texts=None, *, input_ids=None, attention_mask=None) -> jax.Array:
    """L2-normalized text embeddings (batch, embed_dim).

    Given strings, they are tokenized as the reference does: "summarize:" prefix, BOS and EOS,
    padded with 0 to at most 80 tokens. Given `input_ids` and `attention_mask`, those are used
    as they are (right padding).
    """
    config = self._internvl()
    if (texts is None) == (input_ids is None):
      raise ValueError("Pass either texts or input_ids (with attention_mask), not both.")
    if texts is not None:
      if self.tokenizer is None:
        raise ValueError("This checkpoint has no tokenizer.model; pass input_ids and attention_mask.")
      input_ids = np.stack([self.tokenizer.encode_caption(text, TEXT_MAX_TOKENS)[0] for text in texts])
      attention_mask = input_ids > 0
    elif attention_mask is None:
      raise ValueError("input_ids need their attention_mask (1 for real tokens, 0 for padding).")
    return _encode_text(config, self.params, jnp.asarray(input_ids, jnp.int32),
                        jnp.asarray(attention_mask, bool))

  def caption(self, pixels, *, prompt: str = "English caption:", num_beams: int = 5,
              min_new_tokens: int = 8, max_new_tokens: int = 30) -> list[str]:
    """Captions by QLLaMA (InternVL-G), with the reference's prompt and beam-search settings."""
    config = self._internvl_g("caption()")
    if self.tokenizer is None:
      raise ValueError("Captioning needs the checkpoint's tokenizer.model.")
    prompt_ids = np.asarray([[self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]], np.int32)
    ids, _ = caption.caption(config, self.params, jnp.asarray(pixels, jnp.float32), prompt_ids,
                             num_beams=num_beams, min_new_tokens=min_new_tokens,
                             max_new_tokens=max_new_tokens)
    eos = self.tokenizer.eos_id
    return [self.tokenizer.decode(_until(list(row), eos)) for row in np.asarray(ids)]

  def _chat(self, what: str) -> ChatConfig:
    if not isinstance(self.config, ChatConfig):
      raise ValueError(f"{what} needs an InternVL-Chat model; this is a "
                       f"{type(self.config).__name__}.")
    return self.config

  def image_features(self, pixels) -> jax.Array:
    """The LLM tokens of each tile, as the official `extract_feature`: (tiles, num_image_tokens,
    LLM width) of (tiles, size, size, 3) ImageNet-normalized NHWC pixels. Compiled once per
    shape."""
    config = self._chat("image_features()")
    return _image_features(config, self.params, jnp.asarray(pixels, jnp.float32))

  def chat_logits(self, tiles, tile_counts, input_ids, attention_mask) -> jax.Array:
    """(batch, length, vocab) float32 LLM logits of prompts with their images spliced in, as the
    official forward gives them.

    `tiles` (batch, slots, size, size, 3) ImageNet-normalized NHWC, the first `tile_counts[b]`
    slots of row b real; `input_ids` hold `num_image_tokens` <IMG_CONTEXT> tokens per real tile,
    which the tiles' features replace in order; `attention_mask` is 1 on real tokens (left or
    right padding).
    """
    config = self._chat("chat_logits()")
    tiles, tile_counts = np.asarray(tiles, np.float32), np.asarray(tile_counts, np.int32)
    input_ids, attention_mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, bool)
    # On the host: under jit the image token counts cannot be checked.
    check_inputs(config, tiles, tile_counts, input_ids, attention_mask)
    return _chat_logits(config, self.params, tiles, tile_counts, input_ids, attention_mask)

  def _chat_tokenizer(self, template: str) -> Tokenizer:
    """The tokenizer with the image and template pieces, checked against the model."""
    config = self.config
    if self.tokenizer is None:
      raise ValueError("chat() needs the checkpoint's tokenizer.model.")
    pieces = tokenizer_lib.IMAGE_TOKENS + templates.TEMPLATES[template].special_tokens
    tokenizer = _with_pieces(self.tokenizer, pieces)
    if tokenizer.token_id(tokenizer_lib.IMAGE_CONTEXT) != config.image_context_id:
      raise ValueError(f"The tokenizer's {tokenizer_lib.IMAGE_CONTEXT} is id "
                       f"{tokenizer.token_id(tokenizer_lib.IMAGE_CONTEXT)}, the model's "
                       f"{config.image_context_id}: they do not belong together.")
    largest = max(tokenizer.token_id(piece) for piece in pieces)
    if largest >= config.llm.vocab_size:
      raise ValueError(f"The {template} template's tokens {pieces} reach id {largest}, past the "
                       f"model's vocabulary of {config.llm.vocab_size}: it was not trained with "
                       "this template.")
    return tokenizer

  def _tiles(self, image) -> np.ndarray:
    """(tiles, size, size, 3) normalized tiles of a PIL or uint8 image, cut as the config says, or
    of ready float tiles (one tile may come without its leading axis)."""
    config = self.config
    if not isinstance(image, Image.Image) and np.asarray(image).dtype == np.uint8:
      image = Image.fromarray(np.asarray(image))
    if isinstance(image, Image.Image):
      image = image.convert("RGB")
      tiles = (tiling.tile_image(image, config.image_size, config.min_dynamic_patch,
                                 config.max_dynamic_patch, config.use_thumbnail)
               if config.dynamic_image_size else [transforms.resize(image, config.image_size)])
      return np.stack([transforms.to_normalized_array(tile) for tile in tiles])
    tiles = np.asarray(image, np.float32)
    tiles = tiles[None] if tiles.ndim == 3 else tiles
    if tiles.ndim != 4 or tiles.shape[1:] != (config.image_size, config.image_size, 3):
      raise ValueError(f"Ready tiles must be (tiles, {config.image_size}, {config.image_size}, 3) "
                       f"normalized floats; got shape {tiles.shape}. Pass a PIL or uint8 image to "
                       "have it tiled.")
    return tiles

  def _chat_batch(self, images, questions, template, system_message) -> _ChatBatch:
    """The (image, question) pairs as padded prompts in the template, and their tiles."""
    config = self._chat("chat()")
    template = config.template if template is None else template
    if template is None:
      raise ValueError("This checkpoint's config names no chat template (config.template); pass "
                       f"template=, one of {tuple(templates.TEMPLATES)}.")
    if template not in templates.TEMPLATES:
      raise ValueError(f"Unknown chat template {template!r}; known: {tuple(templates.TEMPLATES)}.")
    if len(images) != len(questions) or not questions:
      raise ValueError(f"chat() needs one image per question; got {len(images)} images and "
                       f"{len(questions)} questions.")
    tokenizer = self._chat_tokenizer(template)
    system_message = config.system_message if system_message is None else system_message
    tiles = [self._tiles(image) for image in images]
    rows = []
    for image_tiles, question in zip(tiles, questions):
      image_ids = chat_data.image_token_ids(tokenizer, len(image_tiles), config.num_image_tokens,
                                            wrap=config.variant != "v1.0")
      if templates.IMAGE_PLACEHOLDER not in question:
        question = f"{templates.IMAGE_PLACEHOLDER}\n{question}"
      segments = templates.prompt_segments(template, question, system_message)
      rows.append(templates.prompt_ids(segments, tokenizer, image_ids))
    lengths = np.asarray([len(row) for row in rows])
    prompt = np.full((len(rows), bucket(lengths.max(), MIN_PROMPT_BUCKET)), config.llm.pad_id,
                     np.int32)
    pixels = np.zeros((len(rows), bucket(max(map(len, tiles)))) + tiles[0].shape[1:], np.float32)
    for i, (row, image_tiles) in enumerate(zip(rows, tiles)):
      prompt[i, :len(row)], pixels[i, :len(image_tiles)] = row, image_tiles
    context = {"tiles": jnp.asarray(pixels),
               "tile_count": jnp.asarray([len(t) for t in tiles], jnp.int32)}
    return _ChatBatch(tokenizer, templates.stop_id(template, tokenizer), prompt,
                      np.arange(prompt.shape[1]) < lengths[:, None], context)

  def chat(self, images, questions, *, max_new_tokens: int = 64, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           system_message: str | None = None, template: str | None = None) -> list[str]:
    """InternVL-Chat's answers to (image, question) pairs, one per pair, batched.

    An image is a PIL image or a uint8 (height, width, 3) array, cut into tiles as the config says
    (`dynamic_image_size`, `min/max_dynamic_patch`, `use_thumbnail`), or its ready (tiles, size,
    size, 3) ImageNet-normalized tiles. A question gets the image placeholder in front unless it
    has one; the prompt follows the config's template and system message (`template` and
    `system_message` override them), and the answer ends at the template's stop token. Greedy, or
    sampled with transformers' temperature / top-k (0: off) / top-p from `seed`.

    Prompts are right-padded to a power of two (at least `MIN_PROMPT_BUCKET`) and tile slots to a
    power of two, so generation compiles once per batch size and bucket, not per prompt.
    """
    batch = self._chat_batch(images, questions, template, system_message)
    search = dict(max_new_tokens=max_new_tokens, eos_id=batch.stop, pad_id=self.config.llm.pad_id)
    args = (ChatDecoder(self.config), self.params, batch.prompt, batch.mask, batch.context)
    if do_sample:
      answers = generate.sample(*args, sampling=generate.Sampling(temperature, top_k, top_p),
                                seed=seed, **search)
    else:
      answers = generate.greedy_search(*args, **search)
    return [batch.tokenizer.decode(_until(list(row), batch.stop)) for row in np.asarray(answers)]

  def stream_chat(self, image, question: str, *, max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  system_message: str | None = None,
                  template: str | None = None) -> Iterator[str]:
    """`chat` of one (image, question) pair as it is generated: yields the answer's text in pieces
    that join to the same answer, each as soon as its tokens are out (the prefill and the step
    are compiled once each)."""
    batch = self._chat_batch([image], [question], template, system_message)
    sampling = generate.Sampling(temperature, top_k, top_p) if do_sample else None
    tokens = generate.stream(ChatDecoder(self.config), self.params, batch.prompt, batch.mask,
                             batch.context, sampling=sampling, seed=seed,
                             max_new_tokens=max_new_tokens, eos_id=batch.stop,
                             pad_id=self.config.llm.pad_id)
    ids, shown = [], ""
    for token in tokens:
      if token[0] == batch.stop:
        break
      ids.append(int(token[0]))
      text = batch.tokenizer.decode(ids)
      # A byte-fallback piece may be part of a character, shown as U+FFFD until the rest comes.
      if text.startswith(shown) and not text.endswith("\ufffd"):
        yield text[len(shown):]
        shown = text
    text = batch.tokenizer.decode(ids)
    if text.startswith(shown) and text != shown:
      yield text[len(shown):]

  def save(self, directory: str):
    """Writes an Orbax checkpoint (and the tokenizer) that `load_pretrained` reads back."""
    orbax_io.save(directory, self.config, self.params)
    if self.tokenizer is not None:
      with open(os.path.join(directory, TOKENIZER_FILE), "wb") as f:
        f.write(self.tokenizer.model_proto)


def load_pretrained(path: str, *, allow_missing: bool = False) -> Pretrained:
  """The model `loading.load_arrays` reads, on the default device, with its tokenizer if it has
  one."""
  config, params, tokenizer_path = loading.load_arrays(path, allow_missing=allow_missing)
  tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path else None
  return Pretrained(config, jax.tree.map(jnp.asarray, params), tokenizer)
