"""grain pipelines: bad records skipped and counted exactly, determinism, checkpoint/restore,
sharding, ITM negatives, global arrays, and the demo dataset."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec
from PIL import Image

from internvl_jax import sharding
from internvl_jax.data import config as config_lib
from internvl_jax.data import demo
from internvl_jax.data import issues
from internvl_jax.data import pipeline
from internvl_jax.data import sources
from internvl_jax.data import tokenizer as tokenizer_lib

NUM_RECORDS = 200


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def good_image(i: int) -> Image.Image:
  return Image.fromarray(np.full((12 + i % 5, 16, 3), i % 250, np.uint8))


# 3% of the records (6 of 200) are bad, one of each kind; four more hold images in other modes
# (kept, converted to RGB and counted), and one more has an over-long caption.
CORRUPTIONS = {
    7: ("image", b"", issues.IMAGE_MISSING),
    23: ("image", b"\x89PNG\r\n\x1a\n garbage", issues.IMAGE_UNDECODABLE),
    41: ("image", encode(good_image(41), "JPEG")[:120], issues.IMAGE_UNDECODABLE),
    58: ("image", encode(Image.new("RGB", (1, 1))), issues.IMAGE_TOO_SMALL),
    152: ("caption", "   ", issues.CAPTION_EMPTY),
    177: ("caption", b"\xff\xfe broken", issues.CAPTION_UNDECODABLE),
}
CONVERSIONS = {77: ("L", "PNG"), 96: ("CMYK", "JPEG"), 113: ("P", "PNG"), 131: ("RGBA", "PNG")}
LONG_CAPTION = 190


def caption_of(i: int) -> str:
  return f"record {i}" + (" and more words" * 40 if i == LONG_CAPTION else "")


def corrupted_records():
  for i in range(NUM_RECORDS):
    record = {"image": encode(good_image(i)), "caption": caption_of(i)}
    if i in CONVERSIONS:
      mode, fmt = CONVERSIONS[i]
      record["image"] = encode(good_image(i).convert(mode), fmt)
    if i in CORRUPTIONS:
      field, value, _ = CORRUPTIONS[i]
      record[field] = value
    yield f"{i:04d}", record


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def corrupted(data_dir):
  return sources.write_dataset("corrupted_pairs", {"train": corrupted_records},
                               sources.pair_features(), data_dir=data_dir)


@pytest.fixture(scope="module")
def tokenizer_path(data_dir, tmp_path_factory):
  texts = [f"summarize:{caption_of(i)}" for i in range(NUM_RECORDS)] + ["English caption:"]
  path = tmp_path_factory.mktemp("tok") / "pairs.model"
  path.write_bytes(tokenizer_lib.train_sentencepiece(texts * 5, 300))
  return str(path)


def pair_config(name, data_dir, tokenizer_path, **loader_overrides) -> config_lib.PairDataConfig:
  loader = dict(sources=(config_lib.Source(name, data_dir=data_dir),), global_batch_size=16,
                seed=3, shard_index=0, shard_count=1)
  loader.update(loader_overrides)
  return config_lib.PairDataConfig(loader=config_lib.LoaderConfig(**loader),
                                   tokenizer_path=tokenizer_path, image_size=8, max_text_len=24)


def record_ids(batch, tokenizer) -> list[int]:
  texts = [tokenizer.decode(row) for row, valid in zip(batch["text"], batch["valid"]) if valid]
  return [int(text.removeprefix("summarize:record ").split(" ")[0]) for text in texts]


@pytest.mark.parametrize("worker_count", [0, 2])
def test_corrupted_records_are_skipped_and_counted_exactly(corrupted, data_dir, tokenizer_path,
                                                          worker_count):
  config = pair_config(corrupted, data_dir, tokenizer_path, num_epochs=1, shuffle=False,
                       worker_count=worker_count).replace(train_augment=False)
  iterator = pipeline.pair_pipeline(config)
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  seen = []
  for batch in iterator:
    assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.float32
    seen += record_ids(batch, tokenizer)
  iterator.close()
  good = sorted(set(range(NUM_RECORDS)) - set(CORRUPTIONS))
  assert sorted(seen) == good and len(seen) == len(good)
  expected = {}
  for _, _, reason in CORRUPTIONS.values():
    expected[reason] = expected.get(reason, 0) + 1
  for mode, _ in CONVERSIONS.values():
    expected[issues.converted_from(mode)] = 1
  expected[issues.CAPTION_TRUNCATED] = 1
  assert iterator.issue_counts() == expected


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_batches(corrupted, data_dir, tokenizer_path):
  config = pair_config(corrupted, data_dir, tokenizer_path).replace(flip=True, itg=True)
  first, second = pipeline.pair_pipeline(config), pipeline.pair_pipeline(config)
  assert_batches_equal(take(first, 3), take(second, 3))
  other = pipeline.pair_pipeline(config.replace(
      loader=config.loader.replace(seed=4)))
  assert not np.array_equal(next(other)["text"], next(pipeline.pair_pipeline(config))["text"])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_restored_iterator_continues_with_the_next_batch(corrupted, data_dir, tokenizer_path,
                                                         worker_count):
  config = pair_config(corrupted, data_dir, tokenizer_path, worker_count=worker_count)
  iterator = pipeline.pair_pipeline(config)
  take(iterator, 4)
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
  counts = iterator.issue_counts()
  expected = take(iterator, 5)  # crosses the epoch boundary (13 batches of 16 per epoch)...
  expected += take(iterator, 9)  # ...and the bad records of the next epoch
  iterator.close()
  restored = pipeline.pair_pipeline(config)
  restored.set_state(state)
  assert restored.issue_counts() == counts
  assert_batches_equal(take(restored, 14), expected)
  assert restored.issue_counts() == iterator.issue_counts()
  assert all(iterator.issue_counts()[issues.converted_from(mode)] >= 1
             for mode, _ in CONVERSIONS.values())
  restored.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shards_are_disjoint_and_cover_the_epoch(corrupted, data_dir, tokenizer_path,
                                                         shuffle):
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  seen = []
  for shard in range(2):
    config = pair_config(corrupted, data_dir, tokenizer_path, num_epochs=1, shuffle=shuffle,
                         shard_index=shard, shard_count=2).replace(train_augment=False)
    assert pipeline.host_batch_size(config.loader) == 8
    for batch in pipeline.pair_pipeline(config):
      seen += record_ids(batch, tokenizer)
  assert sorted(seen) == sorted(set(range(NUM_RECORDS)) - set(CORRUPTIONS))


def read_shards(config, tokenizer, shard_count, batches, states=None):
  """The record ids each of `shard_count` shards reads in its `batches[shard]` batches (all
  of them if None), having continued from `states` if given; and the shards' states."""
  ids, saved = [], []
  for shard in range(shard_count):
    iterator = pipeline.pair_pipeline(config.replace(loader=config.loader.replace(
        shard_index=shard, shard_count=shard_count)))
    if states is not None:
      iterator.continue_from(states)
    read = iterator if batches[shard] is None else take(iterator, batches[shard])
    ids.append([i for batch in read for i in record_ids(batch, tokenizer)])
    saved.append(json.loads(json.dumps(iterator.get_state())))  # what a checkpoint stores
  return ids, saved


def test_a_data_position_continues_on_another_process_count(corrupted, data_dir, tokenizer_path,
                                                            caplog):
  """2 -> 1 -> 2 processes through a shuffled epoch: no record is lost, and only the records
  that one process had read past the other's position are read twice."""
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  config = pair_config(corrupted, data_dir, tokenizer_path, num_epochs=1,
                       global_batch_size=8).replace(train_augment=False)
  (first, second), states = read_shards(config, tokenizer, 2, [3, 5])  # second reads ahead
  one = pipeline.pair_pipeline(config)
  one.continue_from(states)
  # The first process carries the saved counts, so that their sum over processes goes on.
  np.testing.assert_array_equal(issues.dict_to_counts(one.issue_counts()),
                                sum(issues.dict_to_counts(s["issue_counts"]) for s in states))
  assert (f"saved by 2 processes; continuing from global record {2 * states[0]['records_read']}"
          in caplog.text)
  middle = [i for batch in take(one, 4) for i in record_ids(batch, tokenizer)]
  one_state = [json.loads(json.dumps(one.get_state()))]
  assert not set(middle) & set(first)
  assert len(set(middle) & set(second)) <= (states[1]["records_read"] -
                                            states[0]["records_read"])
  after, _ = read_shards(config, tokenizer, 2, [None, None], one_state)
  assert not set(after[0]) & set(after[1])
  before = first + second + middle
  assert not set(before) & set(after[0] + after[1])  # one process is never ahead of itself
  assert set(before + after[0] + after[1]) == set(range(NUM_RECORDS)) - set(CORRUPTIONS)


@pytest.mark.parametrize("mode", ["batch", "batch_hard", "pool"])
def test_itm_negatives_are_other_captions(corrupted, data_dir, tokenizer_path, mode):
  config = pair_config(corrupted, data_dir, tokenizer_path).replace(itm_negatives=mode,
                                                                    itm_pool_size=32)
  batch = next(pipeline.pair_pipeline(config))
  assert batch["itm_text"].shape == batch["text"].shape
  assert not (batch["itm_text"] == batch["text"]).all(axis=1).any()


def packed_pair_config(corrupted, data_dir, tokenizer_path, **loader_overrides):
  """Stage 2's packed pairs: 4 rows of up to 3 pairs, whose ITG captions (12 to 14 tokens with
  this tokenizer and prefix) share 40 tokens: rows fill up in slots or in tokens."""
  config = pair_config(corrupted, data_dir, tokenizer_path, global_batch_size=4,
                       **loader_overrides)
  return config.replace(itg=True, itg_prefix="summarize:", pack_length=40, pack_tiles=3,
                        pack_buffer_size=3)


@pytest.mark.parametrize("worker_count", [0, 2])
def test_packed_pairs_arrive_whole_with_their_captions(corrupted, data_dir, tokenizer_path,
                                                       worker_count):
  # One epoch both ways: every pair once, its image, texts and ITG caption together in a slot;
  # with worker processes, each packs its own records.
  plain_config = pair_config(corrupted, data_dir, tokenizer_path, num_epochs=1,
                             shuffle=False).replace(train_augment=False, itg=True,
                                                    itg_prefix="summarize:")
  plain, plain_iter = {}, pipeline.pair_pipeline(plain_config)
  for batch in plain_iter:
    for i in np.flatnonzero(batch["valid"]):
      plain[tuple(batch["text"][i])] = (batch["image"][i], batch["itg_text"][i],
                                        batch["itg_labels"][i])
  packed_iter = pipeline.pair_pipeline(packed_pair_config(
      corrupted, data_dir, tokenizer_path, num_epochs=1, shuffle=False,
      worker_count=worker_count).replace(train_augment=False))
  found, rows, counts = [], 0, set()
  for batch in packed_iter:
    assert batch["image"].shape == (4, 3, 8, 8, 3) and batch["itg_text"].shape == (4, 40)
    for row in np.flatnonzero(batch["valid"]):
      rows += 1
      slots, filled = batch["itg_slots"][row], batch["slot_valid"][row]
      count = int(filled.sum())
      assert filled[:count].all() and not filled[count:].any() and count == slots.max()
      counts.add(count)
      assert not batch["image"][row, count:].any() and not batch["text"][row, count:].any()
      length = int(np.sum(slots > 0))  # captions in slot order, then padding
      np.testing.assert_array_equal(np.diff(slots[:length]) >= 0, True)
      assert not slots[length:].any() and not batch["itg_text"][row, length:].any()
      assert (batch["itg_labels"][row, length:] == tokenizer_lib.IGNORE_LABEL).all()
      for slot in range(count):
        where = slots == slot + 1
        found.append((tuple(batch["text"][row, slot]), batch["image"][row, slot],
                      batch["itg_text"][row][where], batch["itg_labels"][row][where]))
  assert len(found) == len(plain) == NUM_RECORDS - len(CORRUPTIONS)
  assert rows < len(plain) / 2.5 and {2, 3} <= counts  # rows full in tokens, and in slots
  for text, image, itg_text, itg_labels in found:
    plain_image, plain_itg, plain_labels = plain.pop(text)
    np.testing.assert_array_equal(image, plain_image)
    np.testing.assert_array_equal(itg_text, plain_itg[plain_itg != tokenizer_lib.PAD_ID])
    np.testing.assert_array_equal(itg_labels, plain_labels[:len(itg_text)])
  assert packed_iter.issue_counts() == plain_iter.issue_counts()


def test_a_restored_packed_pair_pipeline_continues_with_the_same_rows(corrupted, data_dir,
                                                                      tokenizer_path):
  config = packed_pair_config(corrupted, data_dir, tokenizer_path).replace(itm_negatives="batch")
  reference = pipeline.pair_pipeline(config)
  take(reference, 3)
  state = json.loads(json.dumps(reference.get_state()))
  assert state["grain"]["rows"], "the packer must hold open rows at the saved position"
  expected = take(reference, 4)
  restored = pipeline.pair_pipeline(config)
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), expected)
  for batch in expected:  # negatives come from the batch's filled slots only
    filled = {tuple(t) for t in batch["text"][batch["slot_valid"]]}
    negatives = batch["itm_text"][batch["slot_valid"]]
    assert {tuple(t) for t in negatives} <= filled
    assert batch["itm_label"].shape == batch["slot_valid"].shape


def test_packing_pairs_needs_itg_and_room_for_a_caption(corrupted, data_dir, tokenizer_path):
  config = pair_config(corrupted, data_dir, tokenizer_path)
  with pytest.raises(ValueError, match="pack_length packs the ITG captions; set itg=True"):
    config.replace(pack_length=40)
  with pytest.raises(ValueError, match="pack_length 20 is shorter than a caption's max_text_len"):
    config.replace(itg=True, pack_length=20)


def test_mixture_follows_weights(data_dir, tokenizer_path):
  def records(tag):
    return lambda: ((f"{i}", {"image": encode(good_image(i)), "caption": f"record {tag}"})
                    for i in range(40))
  a = sources.write_dataset("mix_a", {"train": records(1)}, sources.pair_features(), data_dir)
  b = sources.write_dataset("mix_b", {"train": records(2)}, sources.pair_features(), data_dir)
  loader = config_lib.LoaderConfig(
      sources=(config_lib.Source(a, weight=3.0, data_dir=data_dir),
               config_lib.Source(b, weight=1.0, data_dir=data_dir)),
      global_batch_size=40, shard_index=0, shard_count=1)
  config = config_lib.PairDataConfig(loader=loader, tokenizer_path=tokenizer_path, image_size=8,
                                     max_text_len=24)
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  tags = [tokenizer.decode(row) for b in take(pipeline.pair_pipeline(config), 3) for row in b["text"]]
  assert tags.count("summarize:record 1") == 90 and tags.count("summarize:record 2") == 30


def test_global_arrays_shard_the_batch_axis():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
  host = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
          "valid": np.ones(8, bool)}
  batch = sharding.host_to_global(host, mesh)
  assert batch["image"].shape == (8, 3)
  assert batch["image"].sharding.spec == PartitionSpec(("data", "fsdp"))
  assert len(batch["image"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])


def test_demo_dataset_splits_labels_and_reuse(data_dir, monkeypatch):
  name = demo.ensure_dataset(image_size=16, train_size=60, eval_size=20, data_dir=data_dir)
  train = sources.open_source(config_lib.Source(name, "train", data_dir=data_dir))
  zero_shot = sources.open_source(config_lib.Source(name, "zero_shot", data_dir=data_dir))
  assert (len(train), len(zero_shot)) == (60, 20)
  info = tfds.builder(name, data_dir=data_dir).info
  assert info.features["label"].num_classes == len(demo.CLASS_NAMES) == 36
  train_classes = {train[i]["class_name"].decode() for i in range(len(train))}
  zero_shot_classes = {zero_shot[i]["class_name"].decode() for i in range(len(zero_shot))}
  assert zero_shot_classes <= set(demo.HELD_OUT_CLASSES)
  assert not train_classes & set(demo.HELD_OUT_CLASSES)
  record = train[0]
  assert demo.CLASS_NAMES[record["label"]] == record["class_name"].decode()
  for i in range(len(train)):
    colour, shape = train[i]["class_name"].decode().split(" ")
    captions = [c.decode() for c in train[i]["captions"]]
    assert captions[0] == train[i]["caption"].decode()
    words = [set(c.replace(",", " ").split()) for c in captions]
    # Every template names the shape; all but the three shape-only captions the colour.
    assert all(shape in w for w in words) and sum(colour in w for w in words) == len(words) - 3
    # One question and its answer.
    assert [t.decode() for t in train[i]["conversations"]["from"]] == ["human", "gpt"]
  assert Image.open(io.BytesIO(record["image"])).size == (16, 16)
  # PNG is lossless: the stored images are `record_with_image`'s, pixel for pixel (TFDS stores
  # the records in its own order).
  stored = sorted(np.asarray(Image.open(io.BytesIO(train[i]["image"]))).tobytes()
                  for i in range(len(train)))
  assert stored == sorted(np.asarray(demo.record_with_image(0, "train", i, 16)[1]).tobytes()
                          for i in range(len(train)))
  assert record["conversations"]["value"][0].startswith(b"<image>\n")
  # Built once: a second call finds it and writes nothing.
  monkeypatch.setattr(sources, "write_dataset", lambda *a, **k: pytest.fail("rebuilt"))
  assert demo.ensure_dataset(image_size=16, train_size=60, eval_size=20, data_dir=data_dir) == name


def test_demo_dataset_built_by_several_processes_at_once_is_built_once(tmp_path):
  """The processes of a run on one host all ask for the demo data when they start."""
  script = ("import sys; from internvl_jax.data import demo; "
            "print(demo.ensure_dataset(image_size=16, train_size=40, eval_size=8, "
            "data_dir=sys.argv[1]))")
  runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outputs = [run.communicate(timeout=300) for run in runs]
  assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
  names = {out.strip().splitlines()[-1] for out, _ in outputs}  # the builder's progress before
  assert len(names) == 1
  source = sources.open_source(config_lib.Source(names.pop(), data_dir=str(tmp_path)))
  assert len(source) == 40


def test_demo_pipelines_end_to_end(data_dir):
  name = demo.ensure_dataset(image_size=16, train_size=60, eval_size=20, data_dir=data_dir)
  tokenizer_path = demo.ensure_tokenizer(train_size=60, vocab_size=400, data_dir=data_dir)
  loader = config_lib.LoaderConfig(sources=(config_lib.Source(name, data_dir=data_dir),),
                                   global_batch_size=4, shard_index=0, shard_count=1)
  pairs = next(pipeline.pair_pipeline(config_lib.PairDataConfig(
      loader=loader, tokenizer_path=tokenizer_path, image_size=16, with_class_label=True)))
  assert pairs["image"].shape == (4, 16, 16, 3) and pairs["class_label"].shape == (4,)
  chat = next(pipeline.chat_pipeline(config_lib.ChatDataConfig(
      loader=loader, tokenizer_path=tokenizer_path, template="vicuna_v1", tile_size=8,
      image_tokens_per_tile=2, max_tiles=4, max_len=96, system_message="Answer.")))
  assert chat["tiles"].shape == (4, 5, 8, 8, 3) and (chat["tile_count"] == 5).all()
  assert chat["tokens"].shape == chat["labels"].shape == chat["token_mask"].shape == (4, 96)
  assert ((chat["labels"] != tokenizer_lib.IGNORE_LABEL) <= chat["token_mask"]).all()


def test_a_stream_of_only_bad_records_stops_with_the_reasons(data_dir):
  name = demo.ensure_dataset(image_size=16, train_size=60, eval_size=20, data_dir=data_dir)
  tokenizer_path = demo.ensure_tokenizer(train_size=60, vocab_size=400, data_dir=data_dir)
  loader = config_lib.LoaderConfig(sources=(config_lib.Source(name, data_dir=data_dir),),
                                   global_batch_size=4, shard_index=0, shard_count=1)
  config = config_lib.ChatDataConfig(loader=loader, tokenizer_path=tokenizer_path, tile_size=8,
                                     image_tokens_per_tile=2, max_tiles=4, max_len=12)
  with pytest.raises(RuntimeError, match=issues.CONVERSATION_TOO_LONG):
    next(pipeline.chat_pipeline(config))
