"""CIDEr and BLEU-4 of generated captions, scored by pycocoevalcap's `Cider` and `Bleu`.

The COCO caption evaluation normally tokenizes with its PTB tokenizer, which runs Stanford
CoreNLP under Java; to need no Java the texts are tokenized here instead: lowercased,
punctuation replaced by spaces, split on whitespace. Scores can differ slightly from the PTB
tokenizer's where it splits contractions ("don't" -> "do n't").
"""

import contextlib
import io
import re
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider


def tokenize(text: str) -> str:
  """Lowercase words without punctuation, joined by single spaces (what the scorers split)."""
  return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> dict[str, float]:
  """Corpus CIDEr ("cider") and BLEU-4 ("bleu4") of one prediction per image against that image's
  references, both x100 as the paper reports them.

  CIDEr weighs n-grams by their document frequency over the references of all images, so it
  needs at least two images (with one, every n-gram has zero weight).
  """
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} captions for {len(references)} reference lists.")
  if len(predictions) < 2:
    raise ValueError("CIDEr needs at least two images to weigh n-grams by document frequency.")
  if any(not refs for refs in references):
    raise ValueError("Every image needs at least one reference caption.")
  gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
  res = {i: [tokenize(p)] for i, p in enumerate(predictions)}
  cider, _ = Cider().compute_score(gts, res)
  with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length statistics
    bleu, _ = Bleu(4).compute_score(gts, res)
  return {"cider": 100.0 * float(cider), "bleu4": 100.0 * float(bleu[3])}
