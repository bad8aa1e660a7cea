"""An experiment's batches: its TFDS sources, or the built-in demo data (built on first use)."""

from internvl_jax.data import chat
from internvl_jax.data import config as data_config
from internvl_jax.data import demo
from internvl_jax.data import pipeline
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.train.config import ExperimentConfig


def loader(config: ExperimentConfig, image_size: int,
           vocab_size: int) -> tuple[data_config.LoaderConfig, str]:
  """The loader and tokenizer path of the configured sources, or of the demo data (its images
  rendered at `image_size`, its tokenizer trained with `vocab_size` pieces)."""
  data, train = config.data, config.train
  if data.is_demo:
    sources = (data_config.Source(demo.ensure_dataset(image_size=image_size)),)
    tokenizer = data.tokenizer or demo.ensure_tokenizer(vocab_size=vocab_size)
  else:
    if data.tokenizer is None:
      raise ValueError("data.sources are set but data.tokenizer is not: pass the text tower's "
                       "SentencePiece model, e.g. --set data.tokenizer=/ckpt/tokenizer.model.")
    sources, tokenizer = data.sources, data.tokenizer
  return data_config.LoaderConfig(sources=sources, global_batch_size=train.global_batch_size,
                                  seed=train.seed, worker_count=data.worker_count), tokenizer


def pair_batches(config: ExperimentConfig, **options) -> pipeline.DataIterator:
  """Image-text pairs (stages 1, 2, retrieval fine-tuning); `options` are further
  `PairDataConfig` fields (ITM negatives, ITG inputs)."""
  stage = config.train.stage
  pairs_loader, tokenizer = loader(config, stage.input_size, stage.model.text.vocab_size)
  return pipeline.pair_pipeline(data_config.PairDataConfig(
      loader=pairs_loader, tokenizer_path=tokenizer, image_size=stage.input_size,
      max_text_len=stage.text_len, train_augment=config.data.augment, **options))


def chat_batches(config: ExperimentConfig, **options) -> pipeline.DataIterator:
  """Conversations (stage 3) in the stage's template and tiling; `options` are further
  `ChatDataConfig` fields. The tokenizer, with the image and template tokens it gets appended,
  must be the LLM's vocabulary (the demo's is trained to that size)."""
  stage = config.train.stage
  model = stage.model
  chat_loader, tokenizer_path = loader(config, model.image_size,
                                       model.llm.vocab_size - stage.appended_tokens)
  data = data_config.ChatDataConfig(
      loader=chat_loader, tokenizer_path=tokenizer_path, template=stage.template,
      tile_size=model.image_size, image_tokens_per_tile=model.num_image_tokens,
      wrap_image_tokens=model.variant != "v1.0", dynamic_tiling=stage.max_tiles > 1,
      max_tiles=stage.max_tiles, max_len=stage.max_len, **options)
  if data.max_tiles_per_image != stage.tile_slots:
    raise ValueError(f"The data gives {data.max_tiles_per_image} tiles per image; the stage "
                     f"takes {stage.tile_slots} (max_tiles {stage.max_tiles}).")
  tokenizer = chat.load_chat_tokenizer(tokenizer_path, stage.template)
  context_id = tokenizer.token_id(tokenizer_lib.IMAGE_CONTEXT)
  if (tokenizer.vocab_size, context_id) != (model.llm.vocab_size, model.image_context_id):
    raise ValueError(
        f"The chat tokenizer ({tokenizer_path} with the {stage.template} tokens) has "
        f"{tokenizer.vocab_size} tokens and {tokenizer_lib.IMAGE_CONTEXT} {context_id}; the model "
        f"has {model.llm.vocab_size} and {model.image_context_id}: they must agree.")
  return pipeline.chat_pipeline(data)
