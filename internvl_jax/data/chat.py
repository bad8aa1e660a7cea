"""Record transform for conversations (stage 3): tiles, image tokens, template, labels."""

import grain
import numpy as np

from internvl_jax.data import config as config_lib
from internvl_jax.data import issues
from internvl_jax.data import sources
from internvl_jax.data import templates
from internvl_jax.data import tiling
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms


def load_chat_tokenizer(tokenizer_path: str, template: str) -> tokenizer_lib.ChatTokenizer:
  """The tokenizer (SentencePiece model or tokenizer.json) with the image tokens and the
  template's markers added (the chat model's vocabulary size is this tokenizer's)."""
  special_tokens = tokenizer_lib.IMAGE_TOKENS + templates.TEMPLATES[template].special_tokens
  return tokenizer_lib.load(tokenizer_path, special_tokens)


def image_token_ids(tokenizer: tokenizer_lib.ChatTokenizer, num_tiles: int, tokens_per_tile: int,
                    wrap: bool) -> list[int]:
  """<img> <IMG_CONTEXT> x (tokens_per_tile * num_tiles) </img>; without `wrap` only the
  context tokens (chat v1.0, where the image features simply take their places)."""
  context = [tokenizer.token_id(tokenizer_lib.IMAGE_CONTEXT)] * (tokens_per_tile * num_tiles)
  if not wrap:
    return context
  return [tokenizer.token_id(tokenizer_lib.IMAGE_START), *context,
          tokenizer.token_id(tokenizer_lib.IMAGE_END)]


def decode_turns(conversations) -> list[tuple[str, str]]:
  """(role, text) turns of a TFDS conversations value ({"from": [...], "value": [...]})."""
  roles, values = conversations["from"], conversations["value"]
  if len(roles) != len(values):
    raise issues.SkipRecord(issues.CONVERSATION_MALFORMED, "roles and values differ in length")
  return [(sources.decode_text(role, issues.CONVERSATION_MALFORMED),
           sources.decode_text(value, issues.CONVERSATION_MALFORMED))
          for role, value in zip(roles, values)]


class ChatProcessor(grain.transforms.Map):
  """One record {"image", "conversations"} to an example, or a skipped outcome.

  Example keys: "tiles" float32 [T, S, S, 3] (T = config.max_tiles_per_image, unused tiles
  zero), "tile_count" int32 (0 for text-only records), "tokens" / "labels" int32 [max_len]
  (labels aligned with tokens, IGNORE_LABEL off the answers), "token_mask" bool [max_len].
  """

  def __init__(self, config: config_lib.ChatDataConfig, tokenizer: tokenizer_lib.ChatTokenizer):
    self._config = config
    self._tokenizer = tokenizer

  def map(self, record) -> issues.RecordOutcome:
    return issues.outcome_of(self._process, record)

  def _tiles(self, image_bytes: bytes) -> tuple[list, tuple[str, ...]]:
    """The image's tiles and the reasons to count (its conversion to RGB, if any)."""
    config = self._config
    image, conversions = transforms.decode_rgb(image_bytes, config.min_image_side)
    if not config.dynamic_tiling:
      return [transforms.resize(image, config.tile_size)], conversions
    return tiling.tile_image(image, config.tile_size, config.min_tiles, config.max_tiles,
                             config.use_thumbnail), conversions

  def _process(self, record) -> issues.RecordOutcome:
    config = self._config
    image_bytes = record["image"]
    conversation = templates.parse_conversation(decode_turns(record["conversations"]),
                                                has_image=bool(image_bytes))
    tiles, conversions = self._tiles(image_bytes) if image_bytes else ([], ())
    segments = templates.render(config.template, conversation, config.system_message)
    image_ids = image_token_ids(self._tokenizer, len(tiles), config.image_tokens_per_tile,
                                config.wrap_image_tokens) if tiles else []
    tokenized = templates.tokenize(segments, self._tokenizer, image_ids, config.max_len)
    pixels = np.zeros((config.max_tiles_per_image, config.tile_size, config.tile_size, 3),
                      np.float32)
    for i, tile in enumerate(tiles):
      pixels[i] = transforms.to_normalized_array(tile)
    example = {
        "tiles": pixels,
        "tile_count": np.int32(len(tiles)),
        "tokens": tokenized.tokens,
        "labels": tokenized.labels,
        "token_mask": np.arange(config.max_len) < tokenized.length,
    }
    truncations = (issues.CONVERSATION_TRUNCATED,) if tokenized.truncated else ()
    return issues.RecordOutcome(example, conversions + truncations)
