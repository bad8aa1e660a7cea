"""The trainer's and an experiment's configs, their checks (run before anything compiles) and
dotted-key overrides (`--set train.steps=200`)."""

import ast
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from internvl_jax import sharding
from internvl_jax.data.config import IMAGE_IDS, ITM_NEGATIVES, Source
from internvl_jax.optim import OptimizerConfig, path_name, trainable_mask


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs besides its data iterator.

  `global_batch_size` examples make one optimizer step; they are processed as `accum_steps`
  micro-batches (exact for whole-batch losses, see `train/step.py`).
  """

  stage: Any  # a `train.stage.Stage`: model, loss, FLOPs
  optimizer: OptimizerConfig
  global_batch_size: int
  mesh: sharding.MeshConfig = sharding.MeshConfig()  # and the logical-axis rules
  accum_steps: int = 1
  steps: int | None = None  # None: optimizer.total_steps
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
  profile_steps: tuple[int, int] | None = None  # trace steps [first, last) to WORKDIR/profile
  peak_tflops_per_device: float | None = None  # MFU denominator; None: table, else measured

  def __post_init__(self):
    for name in ("global_batch_size", "accum_steps", "log_every", "checkpoint_every",
                 "keep_checkpoints", "max_bad_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig: {name} must be at least 1, got {getattr(self, name)}.")
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"TrainConfig: steps must be at least 1 (or None), got {self.steps}.")
    if self.profile_steps is not None and not 0 <= self.profile_steps[0] < self.profile_steps[1]:
      raise ValueError(f"TrainConfig: profile_steps must be (first, last) with 0 <= first < last, "
                       f"got {self.profile_steps}.")

  @property
  def num_steps(self) -> int:
    return self.optimizer.total_steps if self.steps is None else self.steps

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation during a run (`internvl_jax.evaluation.evaluate` of each task on `data`): every
  `every` steps and at the end; no evaluation when `every` is None or there are no tasks."""

  every: int | None = None
  tasks: tuple[str, ...] = ()  # "zero_shot", "retrieval", "caption", "chat"
  data: str | None = None  # "demo[:SPLIT]" or "tfds:NAME[:SPLIT]"; needed when enabled
  limit: int | None = None  # examples per task; None: the whole split
  mode: str = "C"  # image embeddings of InternVL-C or -G (zero-shot, retrieval)

  def __post_init__(self):
    if self.every is not None and self.every < 1:
      raise ValueError(f"EvalConfig: every must be at least 1 (or None), got {self.every}.")
    if self.mode not in ("C", "G"):
      raise ValueError(f"EvalConfig: mode must be 'C' or 'G', got {self.mode!r}.")

  @property
  def enabled(self) -> bool:
    return self.every is not None and bool(self.tasks)


# A source or tokenizer is given as itself (a `Source`; a tokenizer file's path), or as a
# builder that makes it on first use and returns it (the demo's: `data.demo.DemoSource`,
# `DemoTokenizer`), so that naming it in a preset builds nothing.
SourceSpec = Source | Callable[[], Source]
TokenizerSpec = str | Callable[[], str]


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """An experiment's training data: its sources mixed by weight (TFDS datasets written by
  tools/build_dataset.py, or the demo's), the text tower's tokenizer, and the options of the
  image-text pipeline (`data.config.PairDataConfig`: augmentation, ITM negatives, ITG inputs,
  image ids) and the conversations' packing (`data.config.ChatDataConfig`), each reachable with
  --set (`--set data.itm_negatives=batch_hard`)."""

  sources: tuple[SourceSpec, ...]
  tokenizer: TokenizerSpec | None = None  # None: to be given, e.g. --set data.tokenizer=PATH
  worker_count: int = 0  # grain worker processes (0: in the training process)
  augment: bool = True  # random resized crops of training images
  flip: bool = False  # and random horizontal flips (with augment)
  itm_negatives: str = "none"  # a negative caption per row: "batch", "batch_hard" or "pool"
  itm_pool_size: int = 1024  # captions of the "pool" negatives
  itg: bool = False  # image-grounded generation inputs: the prefix + caption, and its labels
  itg_prefix: str = "English caption:"
  image_id: str = "none"  # multi-positive ids: "feature" (the record's) or "image_hash"
  # Stage 3: conversations packed into rows of pack_length tokens and pack_tiles tiles (the
  # official max_packed_tokens, num_images_expected, max_buffer_size); stage 2: pairs packed
  # pack_tiles to a row, their ITG captions in one of pack_length tokens; None: one per row. The
  # stage's pack_length and pack_tiles must be the same (train.stage.pack_length=...).
  pack_length: int | None = None
  pack_tiles: int = 40
  pack_buffer_size: int = 20

  def __post_init__(self):
    if not self.sources:
      raise ValueError(
          "DataConfig: sources is empty; name the training data: TFDS datasets written by "
          "tools/build_dataset.py (sources=(Source('cc3m'),), tokenizer=PATH) or the demo's "
          "(sources=(demo.DemoSource(image_size=64),), "
          "tokenizer=demo.DemoTokenizer(vocab_size=512)).")
    for field, choices in (("itm_negatives", ITM_NEGATIVES), ("image_id", IMAGE_IDS)):
      if getattr(self, field) not in choices:
        raise ValueError(f"DataConfig: {field}={getattr(self, field)!r} is not one of {choices}.")
    if self.itm_pool_size < 1:
      raise ValueError(f"DataConfig: itm_pool_size must be at least 1, got {self.itm_pool_size}.")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """What an experiment file's preset is: the trainer's config, its data and evaluation, and
  where the params start. Each `init` path (a previous stage's workdir, an internvl_jax Orbax
  checkpoint or a PyTorch checkpoint directory) provides the parts the stage takes from it, in
  order (e.g. the vision tower from InternVL, then the LLM from Vicuna); they are used only when
  the workdir has no checkpoint to resume from."""

  train: TrainConfig
  data: DataConfig
  eval: EvalConfig = EvalConfig()
  init: tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.init, str):  # one path
      object.__setattr__(self, "init", (self.init,))

  def replace(self, **changes) -> "ExperimentConfig":
    return dataclasses.replace(self, **changes)


# The batch arrays a data option adds (`data.pipeline.pair_pipeline`), its value that adds none,
# and a value that adds them.
_OPTION_ARRAYS = {"itm_negatives": (("itm_text", "itm_label"), "none", "batch"),
                  "itg": (("itg_text", "itg_labels"), False, True),
                  "image_id": (("image_id",), "none", "image_hash")}


def check_experiment(config: ExperimentConfig):
  """The checks across sections, run once every override is applied (overrides apply one at a
  time: a check on construction would refuse two settings that agree only together): the stage
  trains on the arrays of the data options that are on, and only those; evaluation has data."""
  stage = config.train.stage
  takes = set(stage.abstract_batch(1))
  for option, (arrays, off, on) in _OPTION_ARRAYS.items():
    value, needed = getattr(config.data, option), sorted(takes.intersection(arrays))
    if needed and value == off:
      raise ValueError(f"{type(stage).__name__} trains on {needed}, which data.{option}={value!r} "
                       f"does not make; set data.{option}, e.g. --set data.{option}={on}.")
    if not needed and value != off:
      raise ValueError(f"data.{option}={value!r} makes {list(arrays)}, which "
                       f"{type(stage).__name__} does not train on; set it to {off!r}.")
  _check_packing(config)
  if config.eval.enabled and config.eval.data is None:
    raise ValueError(f"eval.tasks {config.eval.tasks} have no data: set eval.data, e.g. "
                     "--set eval.data=tfds:coco_captions:test (or 'demo').")


# The segment ids a packed batch has, by stage: the arrays whose second axis is its rows' tokens
# and slots.
_PACKED_ROWS = {"segment_ids": ("tokens", "tiles"), "itg_slots": ("itg_text", "image")}


def _check_packing(config: ExperimentConfig):
  """Packed data makes rows of data.pack_length tokens and data.pack_tiles slots with segment
  ids: the stage must take those, and take them only from packed data."""
  stage, data = config.train.stage, config.data
  batch = stage.abstract_batch(1)
  packed = [key for key in _PACKED_ROWS if key in batch]
  if not packed:
    if data.pack_length is not None:
      raise ValueError(f"data.pack_length={data.pack_length} packs rows that "
                       f"{type(stage).__name__} does not train on; set it to None, or set the "
                       f"stage's pack_length (--set train.stage.pack_length={data.pack_length}).")
    return
  tokens, slots = _PACKED_ROWS[packed[0]]
  shape = (batch[tokens].shape[1], batch[slots].shape[1])
  if (data.pack_length, data.pack_tiles) != shape:
    raise ValueError(f"{type(stage).__name__} trains on packed rows of {shape[0]} tokens and "
                     f"{shape[1]} slots; data.pack_length={data.pack_length} and "
                     f"data.pack_tiles={data.pack_tiles} must be the same "
                     f"(--set data.pack_length={shape[0]} --set data.pack_tiles={shape[1]}).")


def check_batch(config: TrainConfig, mesh_shape: Mapping[str, int]):
  """Every micro-batch must split evenly over the data-parallel devices."""
  data_parallel = 1
  for axis in sharding.BATCH_AXES:
    data_parallel *= mesh_shape[axis]
  unit = data_parallel * config.accum_steps
  if config.global_batch_size % unit:
    raise ValueError(
        f"global_batch_size {config.global_batch_size} is not divisible by the data-parallel size "
        f"{data_parallel} (mesh {dict(mesh_shape)}) x accum_steps {config.accum_steps} = {unit}; "
        f"use a multiple of {unit}, or change the mesh or accum_steps.")


def check_patterns(optimizer: OptimizerConfig, abstract_params):
  """Trainable, frozen and lr-group regexes that select no param are typos: fail by name."""
  names = [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
  used = [("trainable", p) for p in optimizer.trainable] + [("frozen", p) for p in optimizer.frozen]
  used += [("trainable_layers", p) for p, _ in optimizer.trainable_layers]
  used += [(f"lr_groups[{group!r}]", p) for group, p, _ in optimizer.lr_groups]
  for field, pattern in used:
    if not any(re.search(pattern, name) for name in names):
      raise ValueError(
          f"OptimizerConfig.{field}: the regex {pattern!r} matches no param; fix it or remove it. "
          f"Param names look like {names[:3]}.")
  if not any(np.any(mask) for mask in jax.tree.leaves(trainable_mask(optimizer, abstract_params))):
    raise ValueError("OptimizerConfig: trainable / frozen leave no param to train.")


def parse_settings(settings: list[str]) -> dict[str, Any]:
  """["train.steps=200", "eval.tasks=('chat',)"] -> {"train.steps": 200, ...}: each VALUE a
  Python literal, or else a bare string."""
  changes = {}
  for setting in settings:
    key, sep, value = setting.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {setting!r}: expected KEY=VALUE, e.g. train.steps=200.")
    try:
      changes[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[key.strip()] = value
  return changes


def override(config, changes: Mapping[str, Any]):
  """`config` with dotted fields replaced: {"train.optimizer.learning_rate": 1e-4}. Unknown keys
  and values of the wrong type fail with a message naming the key."""
  for key, value in changes.items():
    config = _replace_path(config, key.split("."), value, key)
  return config


def _replace_path(obj, parts: list[str], value, key: str):
  fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
  if parts[0] not in fields:
    raise ValueError(f"Unknown config key {key!r}: {type(obj).__name__} has no field "
                     f"{parts[0]!r}; its fields are {list(fields)}.")
  if len(parts) > 1:
    value = _replace_path(getattr(obj, parts[0]), parts[1:], value, key)
  else:
    value = _checked(value, typing.get_type_hints(type(obj))[parts[0]], key)
  try:
    return dataclasses.replace(obj, **{parts[0]: value})
  except (TypeError, ValueError) as e:
    raise ValueError(f"--set {key}={value!r}: {e}") from e


def _checked(value, annotation, key: str):
  """`value` if it fits the field's annotation (ints pass for floats, lists for tuples, one item
  for a tuple of one)."""
  if _fits(value, annotation):
    return value
  if isinstance(value, list) and _fits(tuple(value), annotation):
    return tuple(value)
  if _fits((value,), annotation):
    return (value,)
  raise ValueError(f"--set {key}={value!r}: the field takes {_type_name(annotation)}, not "
                   f"{type(value).__name__}.")


def _fits(value, annotation) -> bool:
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if annotation is Any:
    return True
  if annotation is type(None):
    return value is None
  if origin in (typing.Union, types.UnionType):
    return any(_fits(value, arg) for arg in args)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if origin is tuple:
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_fits(v, args[0]) for v in value)
    return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
  if isinstance(annotation, type):
    return isinstance(value, annotation)
  return True  # annotations this check does not model (e.g. callables) are left to the field


def _type_name(annotation) -> str:
  if typing.get_args(annotation) or not hasattr(annotation, "__name__"):
    return str(annotation).replace("typing.", "")
  return annotation.__name__


def preset(presets: Mapping[str, Callable[[], Any]], name: str):
  """The named preset of an experiment; the error lists the known names."""
  if name not in presets:
    raise ValueError(f"Unknown preset {name!r}; this experiment has {sorted(presets)}.")
  return presets[name]()
