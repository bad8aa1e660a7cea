"""The public entry point: `load_pretrained(path)` for PyTorch directories, Orbax checkpoints and
training workdirs."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import caption, generate, loading
from internvl_jax.config import ChatConfig, InternVLConfig, VisionConfig
from internvl_jax.convert import orbax_io
from internvl_jax.convert.pytorch import TOKENIZER_FILE
from internvl_jax.data import chat as chat_data
from internvl_jax.data import templates
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data.tokenizer import Tokenizer
from internvl_jax.models.intern_vit import InternViT, select_layer
from internvl_jax.models.chat import ChatDecoder
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
    return [self.tokenizer.decode(list(row[:list(row).index(eos)] if eos in row else row))
            for row in np.asarray(ids)]

  def chat(self, tiles, question: str, *, template: str = "vicuna_v1",
           system_message: str | None = None, max_new_tokens: int = 64) -> str:
    """InternVL-Chat's greedy answer to a question about one image.

    `tiles` are the image's (tiles, size, size, 3) ImageNet-normalized tiles (one, or the dynamic
    tiling of `internvl_jax.data.tiling` with its thumbnail last). The question gets the image
    placeholder in front unless it has one; the prompt follows the chat template.
    """
    if not isinstance(self.config, ChatConfig):
      raise ValueError(f"chat() needs an InternVL-Chat model; this is a {type(self.config).__name__}.")
    if self.tokenizer is None:
      raise ValueError("chat() needs the checkpoint's tokenizer.model.")
    config = self.config
    tokenizer = _with_pieces(self.tokenizer,
                             tokenizer_lib.IMAGE_TOKENS + templates.TEMPLATES[template].special_tokens)
    if tokenizer.token_id(tokenizer_lib.IMAGE_CONTEXT) != config.image_context_id:
      raise ValueError(f"The tokenizer's {tokenizer_lib.IMAGE_CONTEXT} is id "
                       f"{tokenizer.token_id(tokenizer_lib.IMAGE_CONTEXT)}, the model's "
                       f"{config.image_context_id}: they do not belong together.")
    tiles = np.asarray(tiles, np.float32)
    tiles = tiles[None] if tiles.ndim == 3 else tiles
    image_ids = chat_data.image_token_ids(tokenizer, len(tiles), config.num_image_tokens,
                                          wrap=config.variant != "v1.0")
    if templates.IMAGE_PLACEHOLDER not in question:
      question = f"{templates.IMAGE_PLACEHOLDER}\n{question}"
    ids = templates.prompt_ids(templates.prompt_segments(template, question, system_message),
                               tokenizer, image_ids)
    stop = tokenizer.token_id(templates.IM_END) if template == "internlm2-chat" else tokenizer.eos_id
    context = {"tiles": jnp.asarray(tiles)[None], "tile_count": jnp.asarray([len(tiles)], jnp.int32)}
    answer = generate.greedy_search(ChatDecoder(config), self.params, jnp.asarray([ids], jnp.int32),
                                    None, context, max_new_tokens=max_new_tokens, eos_id=stop,
                                    pad_id=config.llm.pad_id)
    answer = list(np.asarray(answer[0]))
    return tokenizer.decode(answer[:answer.index(stop)] if stop in answer else answer)

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
