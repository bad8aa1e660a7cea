"""Data configs: frozen dataclasses that fail on construction with a message saying what to fix."""

import dataclasses

from internvl_jax.data import packing as packing_lib
from internvl_jax.data import templates

ITM_NEGATIVES = ("none", "batch", "batch_hard", "pool")
EVAL_RESIZES = ("resize_center_crop", "resize")
TEMPLATES = tuple(templates.TEMPLATES)
IMAGE_IDS = ("none", "feature", "image_hash")


def _check_choice(owner: str, field: str, value, choices):
  if value not in choices:
    raise ValueError(f"{owner}: {field}={value!r} is not one of {choices}.")


def _check_positive(owner: str, field: str, value):
  if value <= 0:
    raise ValueError(f"{owner}: {field} must be positive, got {value}.")


@dataclasses.dataclass(frozen=True)
class Source:
  """One TFDS dataset split read with `tfds.data_source`.

  `name` is the TFDS name, with its config if it has one ("internvl_demo_shapes/64px_png_seed0").
  `weight` is its share of the mixture; weights are normalized over the sources.
  """

  name: str
  split: str = "train"
  weight: float = 1.0
  data_dir: str | None = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets

  def __post_init__(self):
    if not self.name:
      raise ValueError("Source: name must name a TFDS dataset.")
    if not self.weight > 0:
      raise ValueError(f"Source {self.name}: weight must be positive, got {self.weight}.")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """How records are read, shuffled, sharded over processes and batched.

  Training streams (num_epochs None) mix the sources by weight, each repeated forever and
  reshuffled every epoch. A finite stream reads every source num_epochs times, one after the
  other, and ignores the weights; its last batch is padded (see pipeline.VALID).
  """

  sources: tuple[Source, ...]
  global_batch_size: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None repeats forever (training); 1 for evaluation
  worker_count: int = 0  # grain worker processes; 0 processes records in this process
  worker_buffer_size: int = 2  # batches each worker keeps ready
  read_threads: int = 4  # threads reading and transforming records per process or worker
  # This process's shard of the data; None means jax.process_index() / jax.process_count().
  shard_index: int | None = None
  shard_count: int | None = None

  def __post_init__(self):
    owner = "LoaderConfig"
    if not self.sources:
      raise ValueError(f"{owner}: sources is empty; give at least one Source.")
    if not all(isinstance(s, Source) for s in self.sources):
      raise ValueError(f"{owner}: sources must be a tuple of Source, got {self.sources!r}.")
    _check_positive(owner, "global_batch_size", self.global_batch_size)
    if self.num_epochs is not None:
      _check_positive(owner, "num_epochs", self.num_epochs)
    if self.worker_count < 0:
      raise ValueError(f"{owner}: worker_count must be >= 0, got {self.worker_count}.")
    _check_positive(owner, "worker_buffer_size", self.worker_buffer_size)
    _check_positive(owner, "read_threads", self.read_threads)
    if (self.shard_index is None) != (self.shard_count is None):
      raise ValueError(f"{owner}: set both shard_index and shard_count, or neither.")
    if self.shard_count is not None:
      _check_positive(owner, "shard_count", self.shard_count)
      if not 0 <= self.shard_index < self.shard_count:
        raise ValueError(
            f"{owner}: shard_index {self.shard_index} is outside [0, {self.shard_count}).")
      if self.global_batch_size % self.shard_count:
        raise ValueError(
            f"{owner}: global_batch_size {self.global_batch_size} is not divisible by "
            f"shard_count {self.shard_count}.")

  def replace(self, **changes) -> "LoaderConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class PairDataConfig:
  """Image-text pairs for stages 1 and 2 (and their evaluations).

  With `train_augment` the image gets a random resized crop (area fraction in `crop_scale`,
  aspect ratio in [3/4, 4/3]) and an optional flip; without it, `eval_resize` is applied:
  "resize_center_crop" (classification: shorter side to image_size, center crop) or "resize"
  (retrieval: plain resize to a square), as in spec 3.5.
  """

  loader: LoaderConfig
  tokenizer_path: str
  image_size: int = 224
  train_augment: bool = True
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip: bool = False
  eval_resize: str = "resize_center_crop"
  min_image_side: int = 2  # images narrower or shorter than this are skipped
  max_text_len: int = 80
  caption_prefix: str = "summarize:"
  with_class_label: bool = False  # pass the record's "label" through (zero-shot evaluation)
  # Retrieval fine-tuning's multi-positive targets (spec 4.3): "image_id" int32 per example, from
  # the record's integer "image_id" feature, or a 31-bit hash of its encoded image bytes (the
  # captions of one image share it when each caption is a record holding the same file).
  image_id: str = "none"
  # Stage 2: ITM negatives and ITG inputs (spec 4.2).
  itm_negatives: str = "none"
  itm_pool_size: int = 1024
  itg: bool = False
  itg_prefix: str = "English caption:"
  # Stage 2 with ITG: pairs packed pack_tiles to a row by their ITG captions, which share a row of
  # pack_length tokens (`data/packing.py`), at most pack_buffer_size rows open; None: one per row.
  pack_length: int | None = None
  pack_tiles: int = 8
  pack_buffer_size: int = 20

  def __post_init__(self):
    owner = "PairDataConfig"
    if not self.tokenizer_path:
      raise ValueError(f"{owner}: tokenizer_path must point to a SentencePiece model.")
    _check_positive(owner, "image_size", self.image_size)
    low, high = self.crop_scale
    if not 0 < low <= high <= 1:
      raise ValueError(f"{owner}: crop_scale must satisfy 0 < low <= high <= 1, got "
                       f"{self.crop_scale}.")
    _check_choice(owner, "eval_resize", self.eval_resize, EVAL_RESIZES)
    if self.min_image_side < 1:
      raise ValueError(f"{owner}: min_image_side must be >= 1, got {self.min_image_side}.")
    if self.max_text_len < 3:
      raise ValueError(f"{owner}: max_text_len must hold BOS, one token and EOS (>= 3), got "
                       f"{self.max_text_len}.")
    _check_choice(owner, "image_id", self.image_id, IMAGE_IDS)
    _check_choice(owner, "itm_negatives", self.itm_negatives, ITM_NEGATIVES)
    if self.itm_negatives == "pool":
      _check_positive(owner, "itm_pool_size", self.itm_pool_size)
    if self.pack_length is not None:
      if not self.itg:
        raise ValueError(f"{owner}: pack_length packs the ITG captions; set itg=True, or "
                         "pack_length=None.")
      if self.pack_length < self.max_text_len:
        raise ValueError(f"{owner}: pack_length {self.pack_length} is shorter than a caption's "
                         f"max_text_len {self.max_text_len}; raise it or lower max_text_len.")
      _check_positive(owner, "pack_tiles", self.pack_tiles)
      _check_positive(owner, "pack_buffer_size", self.pack_buffer_size)
    if self.itm_negatives in ("batch", "batch_hard"):
      host_batch = self.loader.global_batch_size // (self.loader.shard_count or 1)
      if self.pack_length is not None:
        host_batch *= self.pack_tiles
      if host_batch < 2:
        raise ValueError(f"{owner}: itm_negatives={self.itm_negatives!r} needs at least 2 "
                         f"examples per host batch, got {host_batch}.")

  @property
  def packing(self) -> packing_lib.Packing | None:
    if self.pack_length is None:
      return None
    return packing_lib.Packing(self.pack_length, self.pack_tiles, self.pack_buffer_size)

  def replace(self, **changes) -> "PairDataConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
  """Conversations for stage 3 (spec 4.4).

  The image placeholder "<image>" in the human turn becomes `image_tokens_per_tile` context
  tokens per tile, wrapped in <img> ... </img> when `wrap_image_tokens` (chat v1.1+). With
  `dynamic_tiling` the image is cut into 1..max_tiles tiles of tile_size (plus a thumbnail when
  `use_thumbnail` and more than one tile); otherwise it is resized to one tile.

  With `pack_length` set, conversations are packed several to a row (`data/packing.py`) of
  `pack_length` tokens and `pack_tiles` tile slots (the official `max_packed_tokens` and
  `num_images_expected`), at most `pack_buffer_size` rows open (`max_buffer_size`).
  """

  loader: LoaderConfig
  tokenizer_path: str
  template: str = "internlm2-chat"
  system_message: str | None = None  # None: the template's default
  tile_size: int = 448
  image_tokens_per_tile: int = 256
  wrap_image_tokens: bool = True
  dynamic_tiling: bool = True
  min_tiles: int = 1
  max_tiles: int = 6
  use_thumbnail: bool = True
  min_image_side: int = 2
  max_len: int = 4096
  pack_length: int | None = None  # None: one conversation per row of max_len tokens
  pack_tiles: int = 40
  pack_buffer_size: int = 20

  def __post_init__(self):
    owner = "ChatDataConfig"
    if not self.tokenizer_path:
      raise ValueError(f"{owner}: tokenizer_path must point to a SentencePiece model or a "
                       "tokenizer.json.")
    _check_choice(owner, "template", self.template, TEMPLATES)
    _check_positive(owner, "tile_size", self.tile_size)
    _check_positive(owner, "image_tokens_per_tile", self.image_tokens_per_tile)
    if not 1 <= self.min_tiles <= self.max_tiles:
      raise ValueError(f"{owner}: need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, "
                       f"{self.max_tiles}.")
    if self.min_image_side < 1:
      raise ValueError(f"{owner}: min_image_side must be >= 1, got {self.min_image_side}.")
    if self.max_len <= self.image_tokens_per_tile * self.max_tiles_per_image:
      raise ValueError(
          f"{owner}: max_len {self.max_len} cannot hold the image tokens of a fully tiled image "
          f"({self.image_tokens_per_tile} x {self.max_tiles_per_image} tiles) plus any text; "
          f"raise max_len or lower max_tiles.")
    if self.pack_length is not None:
      # A conversation (at most max_len tokens and one image's tiles) always fits a row.
      if self.pack_length < self.max_len:
        raise ValueError(f"{owner}: pack_length {self.pack_length} is shorter than a "
                         f"conversation's max_len {self.max_len}; raise it or lower max_len.")
      if self.pack_tiles < self.max_tiles_per_image:
        raise ValueError(f"{owner}: pack_tiles {self.pack_tiles} cannot hold one image's "
                         f"{self.max_tiles_per_image} tiles.")
      _check_positive(owner, "pack_buffer_size", self.pack_buffer_size)

  @property
  def packing(self) -> packing_lib.Packing | None:
    if self.pack_length is None:
      return None
    return packing_lib.Packing(self.pack_length, self.pack_tiles, self.pack_buffer_size)

  @property
  def max_tiles_per_image(self) -> int:
    """Tiles an image can become, thumbnail included: the tile axis of the batch."""
    if not self.dynamic_tiling:
      return 1
    return self.max_tiles + (1 if self.use_thumbnail and self.max_tiles > 1 else 0)

  def replace(self, **changes) -> "ChatDataConfig":
    return dataclasses.replace(self, **changes)
