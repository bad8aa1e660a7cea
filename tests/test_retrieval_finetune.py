"""Retrieval fine-tuning (spec 4.3): the loss against a plain reference with multi-positive ids,
exact accumulation, the reference's layer-wise lr decay, warm starts, image ids from the data,
and the experiment's demo preset end to end."""

import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from internvl_jax import losses, optim, sharding
from internvl_jax.config import internvl_preset, llama_preset
from internvl_jax.data import config as data_config
from internvl_jax.data import demo, pipeline, sources
from internvl_jax.data import pairs as pairs_lib
from internvl_jax.models import internvl
from internvl_jax.models.interpolate import resize_pos_embed
from internvl_jax.stages.retrieval import NO_WEIGHT_DECAY, RetrievalStage, layer_decay
from internvl_jax.train.config import TrainConfig
from internvl_jax.train.loop import Trainer

from train_fixtures import GRADIENT_OPTIMIZER, load_experiment, one_step, train_config

MODEL = internvl_preset("tiny")
TEXT_LEN = 10
BATCH = 8
# Rows 0-1 and 3-5 are captions of one image each; the last row is padding (its id 0 must not
# make it a positive of row 0).
IMAGE_IDS = np.array([0, 0, 7, 3, 3, 3, 9, 0], np.int32)


def make_batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  cfg = MODEL.text
  text = np.zeros((BATCH, TEXT_LEN), np.int32)
  for row, length in enumerate(rng.integers(3, TEXT_LEN + 1, size=BATCH)):
    text[row, :length] = rng.integers(3, cfg.vocab_size, size=length)
    text[row, 0], text[row, length - 1] = cfg.bos_id, cfg.eos_id
  valid = np.ones((BATCH,), bool)
  valid[-1] = False
  batch = {"image": rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32), "text": text,
           "itm_text": np.roll(text, 1, axis=0), "image_id": IMAGE_IDS, "valid": valid}
  for name in ("image", "text", "itm_text"):
    batch[name][-1] = 0
  return batch


def log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def reference_itc(image, text, scale, ids):
  """The reference's soft-target ITC (internvl_stage2_retrieval), in float64."""
  sim = scale * image @ text.T
  pos = (ids[:, None] == ids[None, :]).astype(np.float64)
  targets = pos / pos.sum(axis=1, keepdims=True)
  i2t = -np.sum(log_softmax(sim) * targets, axis=1).mean()
  t2i = -np.sum(log_softmax(sim.T) * targets, axis=1).mean()
  return (i2t + t2i) / 2


def unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_equals_the_reference_with_multi_positive_ids():
  rng = np.random.default_rng(0)
  features = {"image": unit(rng, (BATCH, 16)), "backbone": unit(rng, (BATCH, 16)),
              "text": unit(rng, (BATCH, 16)), "itm_logits": rng.normal(size=(BATCH, 2, 2))}
  params = {"logit_scale": np.float32(np.log(20.0))}
  batch = make_batch()
  stage = RetrievalStage(MODEL, text_len=TEXT_LEN)
  loss, metrics = stage.loss(params, jax.tree.map(np.float32, features), batch)
  keep = batch["valid"]  # the padding row is neither a row nor a column
  ids = IMAGE_IDS[keep]
  itc = reference_itc(features["image"][keep], features["text"][keep], 20.0, ids)
  backbone = reference_itc(features["backbone"][keep], features["text"][keep], 20.0, ids)
  # ITM: each image with its negative (label 0) and its own caption (label 1).
  itm_logits = features["itm_logits"][keep].reshape(-1, 2)
  itm = -np.mean(log_softmax(itm_logits)[np.arange(len(itm_logits)), np.tile([0, 1], len(ids))])
  np.testing.assert_allclose(metrics["itc_loss"], itc, rtol=1e-5)
  np.testing.assert_allclose(metrics["backbone_itc_loss"], backbone, rtol=1e-5)
  np.testing.assert_allclose(metrics["itm_loss"], itm, rtol=1e-5)
  np.testing.assert_allclose(loss, itc + backbone + itm, rtol=1e-5)

  # Distinct ids (or multi_positive=False): the usual diagonal CLIP loss.
  distinct = dict(batch, image_id=np.arange(BATCH, dtype=np.int32))
  _, metrics = stage.loss(params, jax.tree.map(np.float32, features), distinct)
  _, diagonal = RetrievalStage(MODEL, multi_positive=False).loss(
      params, jax.tree.map(np.float32, features), batch)
  clip, _ = losses.clip_softmax_loss(features["image"][keep], features["text"][keep],
                                     params["logit_scale"])
  np.testing.assert_allclose(metrics["itc_loss"], clip, rtol=1e-5)
  np.testing.assert_allclose(diagonal["itc_loss"], clip, rtol=1e-5)


def config(**changes) -> TrainConfig:
  optimizer = GRADIENT_OPTIMIZER.replace(
      weight_decay=0.05, no_weight_decay=NO_WEIGHT_DECAY, total_steps=10,
      layer_decay=layer_decay(MODEL, 0.9))
  return train_config(RetrievalStage(MODEL, text_len=TEXT_LEN), optimizer,
                      global_batch_size=BATCH, **changes)


def test_accumulated_step_equals_the_unaccumulated_step():
  state, metrics = one_step(Trainer(config()), make_batch())
  acc_state, acc_metrics = one_step(
      Trainer(config(accum_steps=2, mesh=sharding.MeshConfig(data=2, fsdp=2, tensor=2))),
      make_batch())
  assert np.isfinite(metrics["loss"])
  for name in ("loss", "itc_loss", "backbone_itc_loss", "itm_loss", "grad_norm"):
    np.testing.assert_allclose(acc_metrics[name], metrics[name], rtol=2e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               acc_state.params, state.params)


def reference_lr_scale(name: str, layer: int | None, model) -> float:
  """`trainer_monkey_patch.py`'s ids on this tree's names; `layer` is the QLLaMA or ViT layer of
  a stacked slice."""
  vit, qllama = model.vision.num_layers + 2, model.text.num_layers + 2
  if name in ("qllama/query_tokens", "logit_scale"):
    num, layer_id = qllama, 0
  elif name.startswith("clip_projector/"):
    num, layer_id = vit, vit
  elif name.startswith(("clip_projector2/", "itm_head/")) or name == "text_projection":
    num, layer_id = qllama, qllama
  elif name.startswith("vision_model/"):
    num, layer_id = vit, 0 if "/embeddings/" in name else layer + 1
  elif "embed_tokens" in name:
    num, layer_id = qllama, 0
  else:
    num, layer_id = qllama, qllama if layer is None else layer + 1
  return min(1.0, 0.9**(num - layer_id - 1))


def test_layer_decay_follows_the_reference_ids():
  model = internvl_preset("tiny", text=llama_preset("tiny", num_layers=4))
  params = internvl.abstract_params(model)
  multipliers = optim.lr_multipliers(
      optim.OptimizerConfig(learning_rate=1e-6, layer_decay=layer_decay(model, 0.9)), params)
  frequency = model.cross_attention_frequency
  for path, value in jax.tree_util.tree_flatten_with_path(multipliers)[0]:
    name = optim.path_name(path)
    if name.startswith("vision_model/blocks/"):
      expected = [reference_lr_scale(name, i, model) for i in range(model.vision.num_layers)]
    elif name.startswith("qllama/layers/"):
      offset = int(name.split("/")[2].removeprefix("layer_"))
      expected = [reference_lr_scale(name, j * frequency + offset, model)
                  for j in range(model.text.num_layers // frequency)]
    else:
      expected = [reference_lr_scale(name, None, model)]
    np.testing.assert_allclose(np.ravel(value)[:len(expected)] if value.ndim else value,
                               1e-6 * np.array(expected if value.ndim else expected[0]),
                               rtol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match="offset"):
    optim.LayerDecay(0.9, 4, blocks="layers/", layers_per_block=2)


def random_params(model, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                      internvl.abstract_params(model))


def test_warm_start_takes_every_param_and_resizes_the_position_embedding():
  source = random_params(MODEL, seed=1)
  stage = RetrievalStage(MODEL.replace(vision=MODEL.vision.replace(image_size=48)))
  fresh = random_params(stage.model, seed=0)
  params = stage.warm_start(fresh, MODEL, source, "stage2")
  resized = resize_pos_embed(source["vision_model"]["embeddings"]["pos_embed"], (6, 6))
  np.testing.assert_allclose(params["vision_model"]["embeddings"]["pos_embed"], resized)
  params["vision_model"]["embeddings"]["pos_embed"] = source["vision_model"]["embeddings"][
      "pos_embed"]
  jax.tree.map(np.testing.assert_array_equal, params, source)

  with pytest.raises(ValueError, match="InternVL-C checkpoint"):
    stage1 = MODEL.replace(variant="C")
    stage.warm_start(fresh, stage1, random_params(stage1, seed=2), "stage1")
  with pytest.raises(ValueError, match="needs a InternVLConfig"):
    stage.warm_start(fresh, MODEL.vision, source["vision_model"], "vit")


def encode_png(value: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def test_pair_pipeline_passes_image_ids(tmp_path):
  captions = ["a dog", "a dog runs", "a cat", "a cat sits"]
  records = lambda: ((f"{i}", {"image": encode_png(i // 2), "caption": c})
                     for i, c in enumerate(captions))
  name = sources.write_dataset("two_images", {"train": records}, sources.pair_features(),
                               data_dir=str(tmp_path))
  tokenizer = demo.ensure_tokenizer()
  loader = data_config.LoaderConfig(
      sources=(data_config.Source(name, data_dir=str(tmp_path)),), global_batch_size=4,
      shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
  pairs = data_config.PairDataConfig(loader=loader, tokenizer_path=tokenizer, image_size=8,
                                     train_augment=False)
  assert "image_id" not in next(pipeline.pair_pipeline(pairs))
  ids = next(pipeline.pair_pipeline(pairs.replace(image_id="image_hash")))["image_id"]
  # Records come in TFDS's order; each image's two captions share its id.
  assert ids.dtype == np.int32 and sorted(ids.tolist()) == sorted(
      [int(pairs_lib.image_hash(encode_png(i // 2))) for i in range(4)])
  assert len(set(ids.tolist())) == 2


def test_demo_preset_trains_two_steps(tmp_path):
  experiment = load_experiment("retrieval_finetune")
  stage2 = load_experiment("stage2_generative")
  # The stage-2 demo's workdir warm-starts this demo. (Its presets may still be TrainConfigs.)
  stage2_demo = stage2.get_config("demo")
  stage2_model = getattr(stage2_demo, "train", stage2_demo).stage.model
  assert experiment.get_config("demo").train.stage.model == stage2_model
  assert experiment.get_config("paper").train.optimizer.total_steps == 1416
  workdir = str(tmp_path / "run")
  # `init=()`: no stage-2 workdir here (the field's type check refuses None). Evaluation is
  # tested in test_evaluation.py.
  experiment.main(["--workdir", workdir, "--set", "train.steps=2", "--set", "init=()",
                   "--set", "eval.every=None"])
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert any("itc_loss" in row and np.isfinite(row["loss"]) for row in rows)
