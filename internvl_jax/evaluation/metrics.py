"""Classification, retrieval and exact-match metrics on embeddings and strings (numpy, host side).

Scores are percentages (0-100), as the paper reports them.
"""

import re

import numpy as np


def zero_shot_classifier(prompt_embeddings: np.ndarray) -> np.ndarray:
  """(classes, dim) weights from (classes, templates, dim) prompt embeddings: each prompt
  L2-normalized, averaged over the templates, normalized again (clip_benchmark's classifier)."""
  embeddings = np.asarray(prompt_embeddings, np.float32)
  if embeddings.ndim != 3:
    raise ValueError(f"prompt_embeddings must be (classes, templates, dim); got shape "
                     f"{embeddings.shape}.")
  embeddings = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
  mean = embeddings.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, float]:
  """Percent of rows whose label is among the k highest logits, for each k (k is capped at the
  number of classes)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != (logits.shape[0],):
    raise ValueError(f"logits must be (examples, classes) and labels (examples,); got "
                     f"{logits.shape} and {labels.shape}.")
  if len(labels) == 0:
    raise ValueError("No examples to score.")
  # Rank of the true class: how many classes score strictly higher.
  true_logit = np.take_along_axis(logits, labels[:, None], axis=1)
  rank = np.sum(logits > true_logit, axis=1)
  return {k: 100.0 * float(np.mean(rank < min(k, logits.shape[1]))) for k in ks}


def _recall(similarity: np.ndarray, positives: np.ndarray, ks) -> dict[int, float]:
  """Percent of rows with a positive column among their k most similar columns."""
  if not positives.any(axis=1).all():
    raise ValueError("Every query needs at least one positive.")
  # The best rank of any positive: columns scoring strictly higher than the best positive.
  best_positive = np.where(positives, similarity, -np.inf).max(axis=1, keepdims=True)
  rank = np.sum(similarity > best_positive, axis=1)
  return {k: 100.0 * float(np.mean(rank < k)) for k in ks}


def retrieval_recall(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                     positives: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """Recall@k image->text ("i2t_r{k}") and text->image ("t2i_r{k}") and their mean ("mean_recall").

  `positives` (images, texts) bool: True where the text is a correct match of the image. An image
  may have several (COCO's five captions) and a text several (a demo caption is true of every
  image with the attributes it names).
  """
  positives = np.asarray(positives, bool)
  if positives.shape != (len(image_embeddings), len(text_embeddings)):
    raise ValueError(f"positives must be (images, texts) = ({len(image_embeddings)}, "
                     f"{len(text_embeddings)}); got {positives.shape}.")
  similarity = np.asarray(image_embeddings, np.float32) @ np.asarray(text_embeddings, np.float32).T
  results = {}
  for direction, (sim, pos) in {"i2t": (similarity, positives),
                                "t2i": (similarity.T, positives.T)}.items():
    for k, recall in _recall(sim, pos, ks).items():
      results[f"{direction}_r{k}"] = recall
  results["mean_recall"] = float(np.mean(list(results.values())))
  return results


def normalize_answer(text: str) -> str:
  """Case-folded, surrounding whitespace stripped, inner whitespace collapsed, one trailing
  period dropped: "It is red." and " it is red" match, "red" and "It is red." do not."""
  text = re.sub(r"\s+", " ", text.strip().lower())
  return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(predictions, references) -> float:
  """Percent of predictions equal to their reference after `normalize_answer`."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
  if not predictions:
    raise ValueError("No answers to score.")
  return 100.0 * float(np.mean([normalize_answer(p) == normalize_answer(r)
                                for p, r in zip(predictions, references)]))
