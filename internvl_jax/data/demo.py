"""The built-in demo dataset: synthetic captioned shapes, and a tokenizer trained on its text.

Each image is one shape (6 kinds) in one colour (6) at one of 9 positions, on a grey background
of 5 kinds. The class is the (colour, shape) pair: 36 classes, of which 6 (one
per colour and per shape) never appear in "train" or "test" and make the "zero_shot" split.
Every record has a caption, every caption template filled in (captioning references), the
class label and name, and a conversation of one question and its answer.
Everything is a function of (seed, split, index): built once into the TFDS data directory on
first use and reused after. `DemoSource` and `DemoTokenizer` are how a preset names them without
building them.
"""

import contextlib
import dataclasses
import fcntl
import io
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from internvl_jax.data import config as config_lib
from internvl_jax.data import sources
from internvl_jax.data import templates
from internvl_jax.data import tokenizer as tokenizer_lib

NAME = "internvl_demo_shapes"
# Told apart at 8-px patches: a diamond (a triangle's apex, a square's diagonals) was the held-out
# classes' most common confusion; a ring shows the background through its middle.
SHAPES = ("circle", "square", "triangle", "ring", "star", "cross")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
    "yellow": (235, 205, 35), "purple": (140, 60, 190), "orange": (240, 135, 25),
}
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# One held-out shape per colour (a diagonal), so every colour and shape is still seen in train.
HELD_OUT_CLASSES = tuple(f"{colour} {SHAPES[i]}" for i, colour in enumerate(COLOURS))
SEEN_CLASSES = tuple(c for c in CLASS_NAMES if c not in HELD_OUT_CLASSES)
POSITIONS = ("top left", "top center", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom center", "bottom right")
# Shape extent as a fraction of the image side. One size: a tiny ViT (8 px patches) learns shapes
# this large within minutes, but not smaller ones, nor two sizes at once.
SHAPE_EXTENT = 0.44
# Bumped whenever what the records hold changes, so that a cached older build is not reused.
VERSION = 7
BACKGROUNDS = ("dark", "light", "gradient", "striped", "noisy")
SPLITS = {"train": 0, "test": 1, "zero_shot": 2}

# The two templates of 8 tokens or more (the captioner's minimum, spec 3.4) name the background,
# which the demo's captioner reads, not the position, which its one cross-attention block does not
# learn to find in stage 2's 2000 steps and would name at chance.
CAPTION_TEMPLATES = (
    "a {colour} {shape} in the {position}",
    "a {colour} {shape}",
    "a photo of a {colour} {shape} on a {background} background",
    "there is a {colour} {shape} on a {background} background",
    "a {shape} coloured {colour}, {position}",
    # Three without the colour, so that in-batch negatives are told apart by their shape alone:
    # stage 1's held-out errors are another shape of the same colour.
    "a {shape} on a {background} background",
    "a {shape}",
    "a {shape} in the {position}",
)
_QUESTIONS = (
    ("What shape is shown?", "A {shape}."),
    ("What colour is the {shape}?", "It is {colour}."),
    ("Where is the {shape}?", "In the {position}."),
    ("Is the background dark, light, gradient, striped or noisy?", "It is {background}."),
    ("Describe the image.", "{caption}."),
)
_SUPERSAMPLE = 2  # shapes are drawn at this multiple of the size and downscaled (antialiasing)


def _with_articles(text: str) -> str:
  """"a orange" -> "an orange"."""
  return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def fill_caption(template: str, attrs: dict) -> str:
  """A caption template filled in with a record's attributes (colour, shape, position,
  background)."""
  return _with_articles(template.format(**attrs))


def _sample_text(rng: np.random.Generator, class_names: tuple[str, ...]) -> dict:
  """Attributes, caption and conversation; drawn before the image so the text of a record
  does not depend on the image size."""
  colour, shape = class_names[rng.integers(len(class_names))].split(" ")
  attrs = {
      "colour": colour, "shape": shape,
      "position": POSITIONS[rng.integers(len(POSITIONS))],
      "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
  }
  chosen = rng.integers(len(CAPTION_TEMPLATES))
  # Every template filled in, the record's own caption first: the captioning references (as COCO
  # has 5 per image), since no captioner can know which template the training caption used.
  captions = [fill_caption(CAPTION_TEMPLATES[i], attrs)
              for i in (chosen, *(i for i in range(len(CAPTION_TEMPLATES)) if i != chosen))]
  caption = captions[0]
  # One question per conversation, so every answer sits at the same distance from the image
  # tokens: with several turns the demo's 2-layer LLM, trained from scratch, does not learn to
  # read the shape's column in stage 3's 600 steps.
  question, answer = _QUESTIONS[rng.integers(len(_QUESTIONS))]
  conversation = [
      {"from": templates.HUMAN,
       "value": templates.IMAGE_PLACEHOLDER + "\n" + question.format(**attrs)},
      {"from": templates.ASSISTANT,
       "value": _with_articles(answer.format(caption=caption[0].upper() + caption[1:], **attrs))},
  ]
  return {"attrs": attrs, "caption": caption, "captions": captions,
          "conversations": conversation, "class_name": f"{colour} {shape}"}


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
  if kind == "dark":
    grey = np.full((size, size), rng.uniform(25, 80))
  elif kind == "light":
    grey = np.full((size, size), rng.uniform(170, 230))
  elif kind == "gradient":
    low, high = sorted(rng.uniform(30, 220, 2))
    ramp = np.linspace(low, high, size)
    grey = np.tile(ramp, (size, 1)) if rng.random() < 0.5 else np.tile(ramp[:, None], (1, size))
  elif kind == "striped":
    period = max(2, size // int(rng.integers(4, 9)))
    stripes = (np.arange(size) // period) % 2
    grey = np.where(stripes, rng.uniform(60, 110), rng.uniform(150, 200))[None, :].repeat(size, 0)
  else:
    grey = rng.uniform(70, 190, (size, size))
  return np.repeat(grey[..., None], 3, axis=-1).clip(0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "square":
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "triangle":
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == "star":
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2, 0.45 * r, r)
    return list(zip(cx + radii * np.cos(angles), cy - radii * np.sin(angles)))
  if shape == "cross":
    a = r / 3
    return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)]
  raise ValueError(f"Unknown shape {shape!r}")


def _render(attrs: dict, size: int, rng: np.random.Generator) -> Image.Image:
  big = size * _SUPERSAMPLE
  image = Image.fromarray(_background(attrs["background"], big, rng))
  row, col = divmod(POSITIONS.index(attrs["position"]), 3)
  radius = SHAPE_EXTENT * big / 2
  jitter = big / 24
  cx = (col + 0.5) * big / 3 + rng.uniform(-jitter, jitter)
  cy = (row + 0.5) * big / 3 + rng.uniform(-jitter, jitter)
  cx, cy = np.clip([cx, cy], radius, big - radius)
  colour = tuple(int(c) for c in np.clip(
      np.asarray(COLOURS[attrs["colour"]]) + rng.integers(-15, 16, 3), 0, 255))
  draw = ImageDraw.Draw(image)
  box = (cx - radius, cy - radius, cx + radius, cy + radius)
  if attrs["shape"] == "circle":
    draw.ellipse(box, fill=colour)
  elif attrs["shape"] == "ring":
    draw.ellipse(box, outline=colour, width=round(0.45 * radius))
  else:
    draw.polygon(_polygon(attrs["shape"], cx, cy, radius), fill=colour)
  return image.resize((size, size), Image.Resampling.BOX)


def _encode(image: Image.Image, image_format: str) -> bytes:
  buffer = io.BytesIO()
  if image_format == "png":
    image.save(buffer, "PNG", compress_level=1)
  else:
    image.save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def _split_classes(split: str) -> tuple[str, ...]:
  return HELD_OUT_CLASSES if split == "zero_shot" else SEEN_CLASSES


def _texts_and_rng(seed: int, split: str, index: int):
  rng = np.random.default_rng([seed, SPLITS[split], index])
  return _sample_text(rng, _split_classes(split)), rng


def record_text(seed: int, split: str, index: int) -> dict:
  """Record `index` of `split` without its image: "attrs" (colour, shape, position,
  background), "caption", "captions" (the references), "conversations", "class_name"."""
  return _texts_and_rng(seed, split, index)[0]


def record_with_image(seed: int, split: str, index: int,
                      image_size: int) -> tuple[dict, Image.Image]:
  """Record `index` of `split`: its `record_text` and its image, as the dataset holds it before
  encoding."""
  text, rng = _texts_and_rng(seed, split, index)
  return text, _render(text["attrs"], image_size, rng)


def _records(split: str, count: int, image_size: int, image_format: str,
             seed: int) -> Iterator[tuple[str, dict]]:
  for index in range(count):
    text, image = record_with_image(seed, split, index, image_size)
    yield f"{split}_{index:06d}", {
        "image": _encode(image, image_format),
        "caption": text["caption"],
        "captions": text["captions"],
        "label": CLASS_NAMES.index(text["class_name"]),
        "class_name": text["class_name"],
        "conversations": text["conversations"],
    }


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": sources.image_feature(),
      "caption": tfds.features.Text(),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "label": tfds.features.ClassLabel(names=CLASS_NAMES),
      "class_name": tfds.features.Text(),
      "conversations": sources.conversations_feature(),
  })


def _check_image_size(image_size: int):
  if image_size < 8:
    raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")


def config_name(image_size: int, image_format: str, seed: int, train_size: int) -> str:
  return f"v{VERSION}_{image_size}px_{image_format}_seed{seed}_train{train_size}"


def ensure_dataset(image_size: int = 64, seed: int = 0, train_size: int = 20_000,
                   eval_size: int = 500, image_format: str = "png",
                   data_dir: str | None = None) -> str:
  """Builds the demo dataset unless it is already in `data_dir`; returns its TFDS name
  (splits "train", "test" with the seen classes, "zero_shot" with the held-out ones)."""
  if image_format not in ("png", "jpeg"):
    raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")
  _check_image_size(image_size)
  config = config_name(image_size, image_format, seed, train_size)
  if not sources.is_written(NAME, config, data_dir):
    # The processes of a multi-process run (or parallel test workers) on one host may all ask for
    # it at once: one builds, the others wait and then find it written.
    with _build_lock(data_dir, config):
      if not sources.is_written(NAME, config, data_dir):
        sizes = {"train": train_size, "test": eval_size, "zero_shot": eval_size}
        sources.write_dataset(
            NAME,
            {split: (lambda s=split, n=n: _records(s, n, image_size, image_format, seed))
             for split, n in sizes.items()},
            features(), data_dir=data_dir, config=config,
            description="Synthetic captioned shapes for the InternVL demo runs.")
  return sources.tfds_name(NAME, config)


@contextlib.contextmanager
def _build_lock(data_dir: str | None, config: str):
  """An exclusive lock (released when the holder exits, even if killed) for building `config`."""
  directory = os.path.join(data_dir or sources.default_data_dir(), NAME)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f".{config}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def tokenizer_corpus(seed: int, train_size: int) -> Iterator[str]:
  """The train split's captions and conversation turns, plus the fixed prompt texts."""
  yield from ("summarize:", "English caption:", templates.VICUNA_SYSTEM,
              "USER: ASSISTANT:", "system\n", "user\n", "assistant\n")
  for index in range(train_size):
    text = record_text(seed, "train", index)
    yield "summarize:" + text["caption"]
    yield from (turn["value"] for turn in text["conversations"])


def ensure_tokenizer(seed: int = 0, train_size: int = 20_000, vocab_size: int = 512,
                     data_dir: str | None = None) -> str:
  """Trains the demo SentencePiece model unless cached next to the demo data; returns its path."""
  directory = os.path.join(data_dir or sources.default_data_dir(), NAME)
  path = os.path.join(directory,
                      f"tokenizer_v{VERSION}_seed{seed}_train{train_size}_vocab{vocab_size}.model")
  if not os.path.exists(path):
    model = tokenizer_lib.train_sentencepiece(tokenizer_corpus(seed, train_size), vocab_size)
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
      f.write(model)
    os.replace(partial, path)  # atomic: concurrent builders never see half a file
  return path


@dataclasses.dataclass(frozen=True)
class DemoSource:
  """A split of the demo dataset as a training or evaluation source, rendered at `image_size`.

  Naming one builds nothing, so presets and ahead-of-time plans stay cheap; calling it builds the
  dataset unless `data_dir` has it and returns the `Source` to read.
  """

  image_size: int
  split: str = "train"
  weight: float = 1.0
  seed: int = 0
  train_size: int = 20_000
  data_dir: str | None = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets

  def __post_init__(self):
    _check_image_size(self.image_size)
    if self.split not in SPLITS:
      raise ValueError(f"The demo data has splits {tuple(SPLITS)}, not {self.split!r}.")

  def __call__(self) -> config_lib.Source:
    name = ensure_dataset(image_size=self.image_size, seed=self.seed, train_size=self.train_size,
                          data_dir=self.data_dir)
    return config_lib.Source(name, self.split, self.weight, self.data_dir)


@dataclasses.dataclass(frozen=True)
class DemoTokenizer:
  """The demo's SentencePiece model of `vocab_size` pieces as a tokenizer: calling it trains the
  model unless it is cached (`ensure_tokenizer`) and returns its path."""

  vocab_size: int
  seed: int = 0
  train_size: int = 20_000
  data_dir: str | None = None

  def __call__(self) -> str:
    return ensure_tokenizer(self.seed, self.train_size, self.vocab_size, self.data_dir)
