"""Record transform for image-text pairs (stages 1 and 2): image augmentation and captions."""

import hashlib
import math

import grain
import numpy as np

from internvl_jax.data import config as config_lib
from internvl_jax.data import issues
from internvl_jax.data import sources
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms

# Captions are cut to this many characters per allowed token before tokenizing, so a
# megabyte-long caption costs no more than a long one; no SentencePiece piece is longer.
_CHARS_PER_TOKEN = 16


def image_hash(data: bytes) -> np.int32:
  """A non-negative 31-bit id of encoded image bytes: equal files get equal ids."""
  digest = hashlib.blake2b(bytes(data), digest_size=4).digest()
  return np.int32(int.from_bytes(digest, "little") & 0x7FFFFFFF)


class PairProcessor(grain.transforms.RandomMap):
  """One record {"image", "caption"[, "label"]} to an example, or a skipped outcome.

  Example keys: "image" float32 [S, S, 3]; "text" int32 [L] ("summarize:" + caption); with ITG
  "itg_text" / "itg_labels" int32 [L]; with class labels "class_label" int32; with image ids
  "image_id" int32.
  """

  def __init__(self, config: config_lib.PairDataConfig, tokenizer: tokenizer_lib.Tokenizer):
    self._config = config
    self._tokenizer = tokenizer
    if config.train_augment:
      # JPEGs decode at reduced size when even the smallest crop keeps full resolution.
      self._draft_size = math.ceil(config.image_size / math.sqrt(config.crop_scale[0]))
    else:
      self._draft_size = config.image_size

  def random_map(self, record, rng: np.random.Generator) -> issues.RecordOutcome:
    return issues.outcome_of(self._process, record, rng)

  def _process(self, record, rng: np.random.Generator) -> issues.RecordOutcome:
    config = self._config
    caption = sources.decode_text(record["caption"], issues.CAPTION_UNDECODABLE).strip()
    if not caption:
      raise issues.SkipRecord(issues.CAPTION_EMPTY)
    caption = caption[:config.max_text_len * _CHARS_PER_TOKEN]
    image, conversions = transforms.decode_rgb(record["image"], config.min_image_side,
                                               self._draft_size)
    if config.train_augment:
      image = transforms.random_resized_crop(image, config.image_size, config.crop_scale, rng)
    elif config.eval_resize == "resize_center_crop":
      image = transforms.resize_center_crop(image, config.image_size)
    else:
      image = transforms.resize(image, config.image_size)
    pixels = transforms.to_normalized_array(image)
    if config.train_augment and config.flip and rng.random() < 0.5:
      pixels = np.ascontiguousarray(pixels[:, ::-1])
    text, truncated = self._tokenizer.encode_caption(caption, config.max_text_len,
                                                     config.caption_prefix)
    example = {"image": pixels, "text": text}
    if config.itg:
      itg_text, itg_labels, itg_truncated = self._tokenizer.encode_prefixed_target(
          config.itg_prefix, caption, config.max_text_len)
      example.update(itg_text=itg_text, itg_labels=itg_labels)
      truncated = truncated or itg_truncated
    if config.with_class_label:
      example["class_label"] = np.int32(record["label"])
    if config.image_id == "feature":
      example["image_id"] = np.int32(record["image_id"])
    elif config.image_id == "image_hash":
      example["image_id"] = image_hash(record["image"])
    truncations = (issues.CAPTION_TRUNCATED,) if truncated else ()
    return issues.RecordOutcome(example, conversions + truncations)
