"""Sequence packing of conversations (`data/packing.py`): rows fill to at most pack_length tokens
and pack_tiles tiles, each conversation arrives whole (tokens, labels, tiles, in order) under its
own segment id, a restored pipeline packs the same rows (and a resumed packed run trains as the
uninterrupted one), and bad records are still counted."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from internvl_jax import optim
from internvl_jax.config import chat_preset
from internvl_jax.data import config as config_lib
from internvl_jax.data import issues
from internvl_jax.data import pipeline
from internvl_jax.data import sources
from internvl_jax.data import templates
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.stages.sft import PROJECTOR_AND_LLM_PARAMS, ChatStage
from internvl_jax.train import loop

from train_fixtures import losses_by_step, read_metrics, train_config

NUM_RECORDS = 48
WORDS = ("red", "square", "circle", "blue", "left", "right", "small", "large", "the", "is")
MAX_LEN, TILE_SIZE, TOKENS_PER_TILE, MAX_TILES = 64, 8, 2, 3  # up to 3 tiles + thumbnail
PACK_LENGTH, PACK_TILES = 128, 10


def image_bytes(i: int) -> bytes:
  """Aspect ratios that tile into 1 to 3 tiles (plus a thumbnail beyond one)."""
  out = io.BytesIO()
  Image.new("RGB", (8 * (1 + i % 3), 8), (i * 5 % 256, 40, 90)).save(out, format="PNG")
  return out.getvalue()


def record(i: int) -> dict:
  """Every 4th record text-only, one malformed (an empty answer: skipped and counted)."""
  rng = np.random.default_rng(i)
  question = " ".join(rng.choice(WORDS, size=rng.integers(1, 8)))
  answer = "" if i == 13 else " ".join(rng.choice(WORDS, size=rng.integers(1, 12)))
  with_image = i % 4 != 3
  prompt = (templates.IMAGE_PLACEHOLDER + "\n" + question) if with_image else question
  return {"image": image_bytes(i) if with_image else b"",
          "conversations": {"from": [templates.HUMAN, templates.ASSISTANT],
                            "value": [prompt, answer]}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  name = sources.write_dataset(
      "packing_conversations",
      {"train": lambda: ((f"{i:03d}", record(i)) for i in range(NUM_RECORDS))},
      sources.chat_features(), data_dir=data_dir)
  path = tmp_path_factory.mktemp("tok") / "chat.model"
  path.write_bytes(tokenizer_lib.train_sentencepiece(
      [" ".join(WORDS), "A chat between a curious user and an assistant."] * 20, 400))
  return name, data_dir, str(path)


def chat_config(data, **changes) -> config_lib.ChatDataConfig:
  name, data_dir, tokenizer_path = data
  loader = config_lib.LoaderConfig(sources=(config_lib.Source(name, data_dir=data_dir),),
                                   global_batch_size=4, seed=1, shard_index=0, shard_count=1,
                                   num_epochs=changes.pop("num_epochs", None))
  fields = dict(loader=loader, tokenizer_path=tokenizer_path, template="vicuna_v1",
                tile_size=TILE_SIZE, image_tokens_per_tile=TOKENS_PER_TILE, max_tiles=MAX_TILES,
                max_len=MAX_LEN, system_message="Answer.")
  return config_lib.ChatDataConfig(**{**fields, **changes})


def packed_config(data, **changes) -> config_lib.ChatDataConfig:
  return chat_config(data, pack_length=PACK_LENGTH, pack_tiles=PACK_TILES, pack_buffer_size=3,
                     **changes)


def rows(batches):
  """The valid rows of host batches, each a dict of arrays."""
  return [{k: v[i] for k, v in batch.items()} for batch in batches
          for i in range(len(batch["valid"])) if batch["valid"][i]]


def conversations(packed_rows, image_context: int):
  """Each packed row's conversations: (tokens, labels, tiles) per segment, in order; a
  conversation's tiles are as many as its image-context tokens say."""
  out = []
  for row in packed_rows:
    tile_start = 0
    for segment in range(1, int(row["segment_ids"].max()) + 1):
      where = row["segment_ids"] == segment
      tokens, labels = row["tokens"][where], row["labels"][where]
      count = int(np.sum(tokens == image_context)) // TOKENS_PER_TILE
      out.append((tokens, labels, row["tiles"][tile_start:tile_start + count]))
      tile_start += count
    assert tile_start == row["tile_count"]
    assert not row["tiles"][tile_start:].any()
  return out


def test_packed_rows_hold_the_unpacked_conversations_whole_and_in_order(data):
  # One epoch both ways: the packed rows hold exactly the unpacked rows' conversations.
  plain = rows(pipeline.chat_pipeline(chat_config(data, num_epochs=1)))
  packed_iter = pipeline.chat_pipeline(packed_config(data, num_epochs=1))
  packed = rows(packed_iter)
  for row in packed:
    segments = row["segment_ids"]
    length = int(np.sum(segments > 0))
    assert length <= PACK_LENGTH and row["tile_count"] <= PACK_TILES
    assert (segments[:length] > 0).all() and not segments[length:].any()  # padding at the end
    assert (np.diff(segments[:length]) >= 0).all() and (np.diff(segments[:length]) <= 1).all()
    assert (row["labels"][segments == 0] == tokenizer_lib.IGNORE_LABEL).all()
    assert not row["tokens"][segments == 0].any()
  unpacked = {tuple(t[1:]): (l[1:], tiles) for t, l, tiles in
              ((r["tokens"][r["token_mask"]], r["labels"][r["token_mask"]],
                r["tiles"][:r["tile_count"]]) for r in plain)}
  context = tokenizer_lib.load(data[2], tokenizer_lib.IMAGE_TOKENS).token_id(
      tokenizer_lib.IMAGE_CONTEXT)
  found = conversations(packed, context)
  assert len(found) == len(plain) == NUM_RECORDS - 1 and len(packed) < len(plain) / 2
  for tokens, labels, tiles in found:
    # A conversation's first label is ignored in a packed row (the token before it is another's).
    assert labels[0] == tokenizer_lib.IGNORE_LABEL
    plain_labels, plain_tiles = unpacked[tuple(tokens[1:])]
    np.testing.assert_array_equal(labels[1:], plain_labels)
    np.testing.assert_array_equal(tiles, plain_tiles)
  assert {len(tiles) for _, _, tiles in found} == {0, 1, 3, 4}  # text-only, 1, 2 or 3 + thumbnail
  assert packed_iter.issue_counts() == {issues.CONVERSATION_MALFORMED: 1}


def test_a_restored_packing_pipeline_continues_with_the_same_rows(data):
  config = packed_config(data)
  reference = pipeline.chat_pipeline(config)
  for _ in range(3):
    next(reference)
  state = json.loads(json.dumps(reference.get_state()))  # as a checkpoint stores it
  assert state["grain"]["rows"], "the packer must hold open rows at the saved position"
  expected = [next(reference) for _ in range(4)]
  restored = pipeline.chat_pipeline(config)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert restored.issue_counts() == reference.issue_counts()


def test_packing_settings_that_cannot_hold_a_conversation_fail_by_name(data):
  with pytest.raises(ValueError, match="pack_length 60 is shorter than a conversation's max_len"):
    chat_config(data, pack_length=60)
  with pytest.raises(ValueError, match="pack_tiles 3 cannot hold one image's 4 tiles"):
    chat_config(data, pack_length=PACK_LENGTH, pack_tiles=3)


def test_a_resumed_packed_run_equals_the_uninterrupted_run(data, tmp_path):
  # A tiny chat model on 32-px tiles (4 image tokens each) of the packing data's vocabulary.
  tiny = chat_preset("tiny-v1.5")
  vocab = 400 + len(tokenizer_lib.IMAGE_TOKENS)
  model = tiny.replace(
      vision=tiny.vision.replace(num_layers=1),
      llm=tiny.llm.replace(vocab_size=vocab, num_layers=1, max_positions=PACK_LENGTH),
      image_context_id=400 + tokenizer_lib.IMAGE_TOKENS.index(tokenizer_lib.IMAGE_CONTEXT))
  stage = ChatStage(model, max_len=MAX_LEN, max_tiles=MAX_TILES, pack_length=PACK_LENGTH,
                    pack_tiles=PACK_TILES, loss_reduction="square")
  optimizer = optim.OptimizerConfig(learning_rate=1e-3, total_steps=4,
                                    trainable=(PROJECTOR_AND_LLM_PARAMS,))
  config = train_config(stage, optimizer, global_batch_size=8, checkpoint_every=2,
                        async_checkpoints=False)
  data_config = packed_config(data, tile_size=model.image_size,
                              image_tokens_per_tile=model.num_image_tokens)
  data_config = data_config.replace(loader=data_config.loader.replace(global_batch_size=8))
  loop.train(config, pipeline.chat_pipeline(data_config), str(tmp_path / "whole"))
  loop.train(config.replace(steps=2), pipeline.chat_pipeline(data_config),
             str(tmp_path / "resumed"))
  loop.train(config, pipeline.chat_pipeline(data_config), str(tmp_path / "resumed"))
  whole = losses_by_step(read_metrics(str(tmp_path / "whole")))
  resumed = losses_by_step(read_metrics(str(tmp_path / "resumed")))
  assert sorted(whole) == [1, 2, 3, 4] and resumed == whole
