"""An experiment's batches: its sources and tokenizer, each made on first use where it is a builder
(`train.config.SourceSpec`), through the pipeline its `DataConfig` options describe."""

from internvl_jax.data import chat
from internvl_jax.data import config as data_config
from internvl_jax.data import pipeline
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.train.config import ExperimentConfig


def _made(spec):
  """`spec`, or what it makes when it is a builder."""
  return spec() if callable(spec) else spec


def loader(config: ExperimentConfig) -> tuple[data_config.LoaderConfig, str]:
  """This process's loader of the configured sources, and the tokenizer's path."""
  data, train = config.data, config.train
  if data.tokenizer is None:
    raise ValueError("data.tokenizer is not set: pass the text tower's SentencePiece model, e.g. "
                     "--set data.tokenizer=/ckpt/tokenizer.model.")
  sources = tuple(_made(source) for source in data.sources)
  return data_config.LoaderConfig(sources=sources, global_batch_size=train.global_batch_size,
                                  seed=train.seed,
                                  worker_count=data.worker_count), _made(data.tokenizer)


def pair_batches(config: ExperimentConfig) -> pipeline.DataIterator:
  """Image-text pairs (stages 1, 2, retrieval fine-tuning) at the stage's input size and text
  length, with the configured augmentation, ITM negatives, ITG inputs, image ids and packing."""
  stage, data = config.train.stage, config.data
  pairs_loader, tokenizer = loader(config)
  return pipeline.pair_pipeline(data_config.PairDataConfig(
      loader=pairs_loader, tokenizer_path=tokenizer, image_size=stage.input_size,
      max_text_len=stage.text_len, train_augment=data.augment, flip=data.flip,
      itm_negatives=data.itm_negatives, itm_pool_size=data.itm_pool_size, itg=data.itg,
      itg_prefix=data.itg_prefix, image_id=data.image_id, pack_length=data.pack_length,
      pack_tiles=data.pack_tiles, pack_buffer_size=data.pack_buffer_size))


def chat_batches(config: ExperimentConfig) -> pipeline.DataIterator:
  """Conversations (stage 3) in the stage's template and tiling, packed as data.pack_length says.
  The tokenizer, with the image and template tokens it gets appended, must be the LLM's
  vocabulary."""
  stage = config.train.stage
  model = stage.model
  chat_loader, tokenizer_path = loader(config)
  data = data_config.ChatDataConfig(
      loader=chat_loader, tokenizer_path=tokenizer_path, template=stage.template,
      tile_size=model.image_size, image_tokens_per_tile=model.num_image_tokens,
      wrap_image_tokens=model.variant != "v1.0", dynamic_tiling=stage.max_tiles > 1,
      max_tiles=stage.max_tiles, max_len=stage.max_len, pack_length=config.data.pack_length,
      pack_tiles=config.data.pack_tiles, pack_buffer_size=config.data.pack_buffer_size)
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
