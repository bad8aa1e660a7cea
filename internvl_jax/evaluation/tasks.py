"""The four evaluation tasks, each on one model and one data split, returning metric -> value
(names without the task prefix; `runner.evaluate` adds it)."""

from collections.abc import Iterator

import numpy as np

from internvl_jax.evaluation import batching
from internvl_jax.evaluation import caption_metrics
from internvl_jax.evaluation import data as data_lib
from internvl_jax.evaluation import metrics
from internvl_jax.evaluation import prompts


def _image_batches(data: data_lib.EvalData, task: str, limit: int | None, batch_size: int,
                   size: int, crop: bool) -> Iterator[tuple[list[dict], np.ndarray]]:
  """(records, their (n, size, size, 3) pixels), at most `batch_size` records at a time."""
  items = data_lib.with_images(data_lib.records(data, limit), task)
  for chunk in batching.chunks(items, batch_size):
    yield [record for record, _ in chunk], np.stack([data_lib.pixels(image, size, crop)
                                                     for _, image in chunk])


def _none_left(task: str, data: data_lib.EvalData) -> ValueError:
  return ValueError(f"{task}: no usable records in {data.name}[{data.split}].")


def zero_shot(model, data: data_lib.EvalData, *, size: int, limit: int | None, batch_size: int,
              mode: str, class_names: tuple[str, ...] | None = None) -> dict[str, float]:
  """Top-1 / top-5 accuracy against a classifier of prompt-ensemble text embeddings; the class
  names are `class_names`, else the dataset's."""
  names = data.class_names() if class_names is None else tuple(class_names)
  texts = [text for name in names for text in data.class_prompts(name)]
  text_embeddings = batching.encode_texts(model, texts, batch_size)
  classifier = metrics.zero_shot_classifier(
      text_embeddings.reshape(len(names), len(data.prompt_templates), -1))
  encode = lambda pixels: model.encode_image(pixels, mode=mode)
  image_embeddings, labels = [], []
  for records, pixels in _image_batches(data, "zero_shot", limit, batch_size, size, crop=True):
    image_embeddings.append(batching.apply_padded(encode, pixels, batch_size))
    labels += [data_lib.label(record) for record in records]
  if not labels:
    raise _none_left("zero_shot", data)
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= len(names):
    raise ValueError(f"zero_shot: labels span [{labels.min()}, {labels.max()}] but there are "
                     f"{len(names)} class names.")
  accuracy = metrics.top_k_accuracy(np.concatenate(image_embeddings) @ classifier.T, labels, (1, 5))
  return {"top1": accuracy[1], "top5": accuracy[5], "num_examples": len(labels),
          "num_classes": len(names)}


def retrieval(model, data: data_lib.EvalData, *, size: int, limit: int | None, batch_size: int,
              mode: str) -> dict[str, float]:
  """Recall@1/5/10 in both directions: every image against every text (the texts and positives
  the dataset gives: a COCO image's reference captions, a demo image's own caption)."""
  encode = lambda pixels: model.encode_image(pixels, mode=mode)
  image_embeddings, image_references, texts, text_images = [], [], [], []
  for records, pixels in _image_batches(data, "retrieval", limit, batch_size, size, crop=False):
    image_embeddings.append(batching.apply_padded(encode, pixels, batch_size))
    for record in records:
      references = data_lib.captions(record)
      image_references.append(set(references))
      for text in data.retrieval_texts(references):
        texts.append(text)
        text_images.append(len(image_references) - 1)
  if not texts:
    raise _none_left("retrieval", data)
  positives = data.retrieval_positives(image_references, texts, text_images)
  text_embeddings = batching.encode_texts(model, texts, batch_size)
  results = metrics.retrieval_recall(np.concatenate(image_embeddings), text_embeddings, positives)
  return {**results, "num_images": len(image_references), "num_texts": len(texts)}


def _class_caption(name: str) -> str:
  return prompts.with_articles(f"a {name}")


def caption(model, data: data_lib.EvalData, *, size: int, limit: int | None, batch_size: int,
            class_names: tuple[str, ...] | None = None) -> dict[str, float]:
  """CIDEr and BLEU-4 of beam-searched captions; with class names (`class_names`, else the
  dataset's baseline ones), also of the "caption-the-class" baseline "a {class name}"
  ("baseline_cider", "baseline_bleu4")."""
  names = tuple(class_names) if class_names else data.baseline_class_names()
  predictions, references, baseline = [], [], []
  for records, pixels in _image_batches(data, "caption", limit, batch_size, size, crop=False):
    predictions += model.caption(batching.pad_rows(pixels, batch_size))[:len(records)]
    references += [data_lib.captions(record) for record in records]
    if names is not None:
      baseline += [_class_caption(names[data_lib.label(record)]) for record in records]
  if not predictions:
    raise _none_left("caption", data)
  results = caption_metrics.caption_scores(predictions, references)
  if names is not None:
    scores = caption_metrics.caption_scores(baseline, references)
    results.update({f"baseline_{name}": value for name, value in scores.items()})
  return {**results, "num_examples": len(predictions)}


def chat(model, data: data_lib.EvalData, *, size: int, limit: int | None, batch_size: int,
         template: str) -> dict[str, float]:
  """Exact-match accuracy of greedy answers, each question asked on its own about one image
  tile (the image resized to the model's tile size), `batch_size` questions per call (the last
  call padded by repeating its last question, so that each prompt length bucket compiles once)."""
  pairs, references = [], []
  for record, image in data_lib.with_images(data_lib.records(data, limit), "chat"):
    tiles = data_lib.pixels(image, size, crop=False)[None]
    for question, answer in data.question_answers(record):
      pairs.append((tiles, question))
      references.append(answer)
  if not pairs:
    raise ValueError(f"chat: no question with an exact-matchable answer in "
                     f"{data.name}[{data.split}].")
  predictions = []
  for chunk in batching.chunks(pairs, batch_size):
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    images, questions = zip(*padded)
    predictions += model.chat(images, questions, template=template)[:len(chunk)]
  return {"exact_match": metrics.exact_match(predictions, references),
          "num_questions": len(predictions)}
