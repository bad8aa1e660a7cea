"""`evaluate(model, task, data)`: the one entry point of the CLI and of evaluation during training.

Metric names are "{task}/{metric}"; scores are percentages (accuracy, recall, exact match) or
x100 (CIDEr, BLEU-4) as the paper reports them, counts are named "num_*":

  zero_shot/top1, zero_shot/top5            top-1 / top-5 accuracy (top-5 capped at the classes)
  zero_shot/num_examples, zero_shot/num_classes
  retrieval/i2t_r1, i2t_r5, i2t_r10         image -> text recall@k
  retrieval/t2i_r1, t2i_r5, t2i_r10         text -> image recall@k
  retrieval/mean_recall                     the mean of the six (the paper's "avg")
  retrieval/num_images, retrieval/num_texts
  caption/cider, caption/bleu4              beam-searched captions ("English caption:", 5 beams)
  caption/baseline_cider, baseline_bleu4    "a {class name}" for every image (demo, class names)
  caption/num_examples
  chat/exact_match, chat/num_questions      greedy answers vs the references
"""

from internvl_jax.config import ChatConfig, InternVLConfig
from internvl_jax.data import templates
from internvl_jax.evaluation import data as data_lib
from internvl_jax.evaluation import tasks

TASKS = ("zero_shot", "retrieval", "caption", "chat")
MODES = ("C", "G")


def check_task(model, task: str, mode: str = "C") -> None:
  """Raises a ValueError saying why `model` cannot do `task` (in `mode`), if it cannot."""
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; known: {TASKS}.")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  kind = type(model.config).__name__
  if task == "chat":
    if not isinstance(model.config, ChatConfig):
      raise ValueError(f"chat needs an InternVL-Chat model; this is a {kind}.")
  else:
    if not isinstance(model.config, InternVLConfig):
      raise ValueError(f"{task} needs an InternVL-C or -G model; this is a {kind}.")
    if model.is_internvl_c and (task == "caption" or mode == "G"):
      what = "captioning" if task == "caption" else f"{task} with mode G"
      raise ValueError(f"{what} needs InternVL-G (QLLaMA, stage 2); this checkpoint is InternVL-C "
                       "(stage 1).")
  if model.tokenizer is None:
    raise ValueError(f"{task} needs the model's tokenizer, and this checkpoint has none "
                     "(tokenizer.model).")


def input_size(model) -> int:
  """The side of the square images the model is evaluated at."""
  if isinstance(model.config, ChatConfig):
    return model.config.image_size
  return model.config.vision.image_size


def evaluate(model, task: str, data: str, *, limit: int | None = None,
             batch_size: int = 32, mode: str = "C", data_dir: str | None = None,
             class_names: tuple[str, ...] | None = None,
             chat_template: str = "vicuna_v1") -> dict[str, float]:
  """Evaluates a `Pretrained` model on one task; returns {"{task}/{metric}": value}.

  Args:
    model: an `internvl_jax.Pretrained` (its params may be sharded device arrays, as in training).
    task: "zero_shot", "retrieval", "caption" (InternVL-G) or "chat" (InternVL-Chat).
    data: "tfds:NAME[:SPLIT]", "demo" or "demo:SPLIT" (see `internvl_jax.evaluation.data`).
    limit: evaluate the first `limit` records only.
    batch_size: images (texts, chat questions) per model call; the last batch is padded, so each
      model function compiles once (chat: once per prompt length bucket).
    mode: "C" or "G" image (and text) embeddings for zero-shot and retrieval.
    data_dir: the TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    class_names: zero-shot class names in label order, instead of the dataset's.
    chat_template: the conversation template of the chat model.
  """
  check_task(model, task, mode)
  if task == "chat" and chat_template not in templates.TEMPLATES:
    raise ValueError(f"Unknown chat template {chat_template!r}; known: "
                     f"{sorted(templates.TEMPLATES)}.")
  size = input_size(model)
  eval_data = data_lib.resolve(data, task, size, data_dir)
  common = {"size": size, "limit": limit}
  if task == "zero_shot":
    results = tasks.zero_shot(model, eval_data, batch_size=batch_size, mode=mode,
                              class_names=class_names, **common)
  elif task == "retrieval":
    results = tasks.retrieval(model, eval_data, batch_size=batch_size, mode=mode, **common)
  elif task == "caption":
    results = tasks.caption(model, eval_data, batch_size=batch_size, class_names=class_names,
                            **common)
  else:
    results = tasks.chat(model, eval_data, batch_size=batch_size, template=chat_template,
                         **common)
  return {f"{task}/{name}": float(value) for name, value in results.items()}


def format_table(results: dict[str, float]) -> str:
  """The results as an aligned two-column text table (counts as integers, scores to 2 places)."""
  if not results:
    return "(no results)"
  width = max(len(name) for name in results)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 8}"]
  for name, value in results.items():
    shown = f"{int(value)}" if name.rsplit("/", 1)[-1].startswith("num_") else f"{value:.2f}"
    lines.append(f"{name:<{width}}  {shown:>8}")
  return "\n".join(lines)
