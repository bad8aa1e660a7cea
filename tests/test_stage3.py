"""Stage 3 (InternVL-Chat SFT): the loss is the mean NLL over answer tokens, accumulation equals
the unaccumulated step, only the projector and LLM train, warm starts take the right parts, the
analytic FLOPs agree with XLA's, and the demo experiment trains and its params chat."""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internvl_jax import loading, optim, sharding
from internvl_jax.config import (ChatConfig, chat_preset, internvl_preset, llama_preset,
                                 vision_preset)
from internvl_jax.data.tokenizer import IGNORE_LABEL, Tokenizer
from internvl_jax.flops import chat_flops
from internvl_jax.models import chat, internvl
from internvl_jax.models.chat import InternVLChat
from internvl_jax.pretrained import Pretrained
from internvl_jax.stages.sft import PROJECTOR_AND_LLM_PARAMS, ChatStage
from internvl_jax.train.config import TrainConfig
from internvl_jax.train.loop import Trainer

from train_fixtures import GRADIENT_OPTIMIZER, load_experiment, one_step, train_config

MODEL = chat_preset("tiny-v1.0")  # ViT width 64 at 48 px: 36 image tokens; LLM width 64
MAX_LEN = 48
BATCH = 16


def make_batch(index: int = 0, batch_size: int = BATCH):
  """Rows as the chat pipeline gives them: BOS, the image tokens (none on text-only rows), a
  prompt, then an answer with labels; the last row is padding (all zeros, valid False)."""
  rng = np.random.default_rng(index)
  size, image_tokens = MODEL.image_size, MODEL.num_image_tokens
  tokens = np.zeros((batch_size, MAX_LEN), np.int32)
  labels = np.full((batch_size, MAX_LEN), IGNORE_LABEL, np.int32)
  tile_count = (np.arange(batch_size) % 4 != 3).astype(np.int32)  # every 4th row text-only
  for row in range(batch_size):
    images = image_tokens * tile_count[row]
    length = rng.integers(images + 5, MAX_LEN + 1)
    answer = rng.integers(1, length - images - 2)
    tokens[row, 0] = MODEL.llm.bos_id
    tokens[row, 1:1 + images] = MODEL.image_context_id
    tokens[row, 1 + images:length] = rng.integers(3, MODEL.image_context_id,
                                                  size=length - 1 - images)
    labels[row, length - answer:length] = tokens[row, length - answer:length]
  batch = {"tiles": rng.normal(size=(batch_size, 1, size, size, 3)).astype(np.float32),
           "tile_count": tile_count, "tokens": tokens, "labels": labels,
           "token_mask": tokens != 0, "valid": np.ones((batch_size,), bool)}
  for value in batch.values():
    value[-1] = 0
  batch["labels"][-1] = IGNORE_LABEL
  return batch


@pytest.fixture(scope="module")
def boxed_params():
  return jax.jit(ChatStage(MODEL, max_len=MAX_LEN).init)(jax.random.key(0))


@pytest.mark.parametrize("template, appended", [
    ("Hermes-2", 5), ("phi3-chat", 7), ("internvl2_5", 5), ("plain", 3)])
def test_stage_takes_the_released_checkpoints_templates(template, appended):
  # The chat tokenizer appends the image tokens and the template's markers, all new to the demo's.
  assert ChatStage(MODEL, max_len=MAX_LEN, template=template).appended_tokens == appended
  with pytest.raises(ValueError, match="unknown template 'chatml'"):
    ChatStage(MODEL, max_len=MAX_LEN, template="chatml")


def test_init_is_the_chat_models_init_boxed_with_axis_names(boxed_params):
  assert isinstance(boxed_params["language_model"]["embed_tokens"]["embedding"], nn.Partitioned)
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, nn.meta.unbox(boxed_params)), chat.init_params(MODEL))


def test_the_loss_is_the_mean_nll_over_the_answer_tokens(boxed_params):
  # Vocabulary blocks of 48 of the 128 tokens: the last block is shifted back.
  stage = ChatStage(MODEL, max_len=MAX_LEN, loss_block_size=48)
  params = nn.meta.unbox(boxed_params)
  batch = make_batch()
  batch["labels"][-1] = batch["labels"][0]  # a padding row's labels must not count
  loss, metrics = jax.jit(lambda b: stage.loss(params, stage.encode(params, b, None), b))(batch)
  logits = InternVLChat(MODEL).apply({"params": params}, batch["tiles"], batch["tile_count"],
                                     batch["tokens"], batch["token_mask"])
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  nll = [-log_probs[row, t - 1, batch["labels"][row, t]]
         for row in range(BATCH - 1) for t in range(1, MAX_LEN)
         if batch["labels"][row, t] != IGNORE_LABEL]
  assert metrics["answer_tokens"] == len(nll)
  np.testing.assert_allclose(loss, np.mean(nll), rtol=1e-5)


def config(**changes) -> TrainConfig:
  optimizer = GRADIENT_OPTIMIZER.replace(trainable=(PROJECTOR_AND_LLM_PARAMS,))
  return train_config(ChatStage(MODEL, max_len=MAX_LEN), optimizer, global_batch_size=BATCH,
                      **changes)


def names(tree) -> set[str]:
  return {optim.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_accumulated_step_equals_the_unaccumulated_step_and_the_vision_tower_is_frozen():
  trainer = Trainer(config())
  initial = jax.tree.map(np.asarray, trainer.factory.init(seed=0))
  state, metrics = one_step(trainer, make_batch())
  # Params sharded, 4-way data parallel, 4 micro-batches.
  acc_state, acc_metrics = one_step(
      Trainer(config(mesh=sharding.MeshConfig(data=2, fsdp=2, tensor=2), accum_steps=4)),
      make_batch())
  assert np.isfinite(metrics["loss"])
  for name in ("loss", "grad_norm", "answer_tokens"):
    np.testing.assert_allclose(acc_metrics[name], metrics[name], rtol=2e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               acc_state.params, state.params)
  trainable = {name for name in names(initial.params) if re.search(PROJECTOR_AND_LLM_PARAMS, name)}
  assert trainable == {name for name in names(initial.params)
                       if not name.startswith("vision_model/")}
  for moments in ("mu", "nu"):
    assert names(optax.tree_utils.tree_get(state.opt_state, moments)) == trainable
  assert_same(initial.params["vision_model"], jax.tree.map(np.asarray,
                                                          state.params["vision_model"]))


def random_like(abstract, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("variant", ["C", "G"])
def test_warm_start_from_internvl_takes_the_vision_tower_and_leaves_the_llm(variant):
  source_config = internvl_preset("tiny", variant=variant)
  # The "qllama" variant on stage 2's QLLaMA: it takes that too.
  model = ChatConfig(vision=source_config.vision, llm=MODEL.llm, variant="qllama",
                     image_size=48, select_layer=-2, image_context_id=MODEL.image_context_id,
                     qllama=source_config.qllama)
  stage = ChatStage(model, max_len=MAX_LEN + 4)
  fresh = random_like(chat.abstract_params(model), 0)
  source = random_like(internvl.abstract_params(source_config), 1)
  out = stage.warm_start(fresh, source_config, source, "stage")
  assert_same(out["vision_model"], source["vision_model"])
  for name in ("language_model", "mlp1", "mlp2"):
    assert_same(out[name], fresh[name])
  if variant == "G":
    assert_same(out["qllama"], {name: source["qllama"][name] for name in fresh["qllama"]})
  else:
    assert_same(out["qllama"], fresh["qllama"])


def test_warm_start_from_llama_fills_the_llm_but_the_appended_tokens():
  stage = ChatStage(MODEL, max_len=MAX_LEN)
  fresh = random_like(chat.abstract_params(MODEL), 0)
  source = jax.tree.map(np.copy, random_like(chat.abstract_params(MODEL), 1)["language_model"])
  vocab = MODEL.llm.vocab_size - 3  # without <img>, </img>, <IMG_CONTEXT>
  source["embed_tokens"]["embedding"] = source["embed_tokens"]["embedding"][:vocab]
  source["lm_head"]["kernel"] = source["lm_head"]["kernel"][:, :vocab]
  out = stage.warm_start(fresh, MODEL.llm.replace(vocab_size=vocab), source, "vicuna")
  llm = out["language_model"]
  np.testing.assert_array_equal(llm["embed_tokens"]["embedding"][:vocab],
                                source["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(llm["embed_tokens"]["embedding"][vocab:],
                                fresh["language_model"]["embed_tokens"]["embedding"][vocab:])
  np.testing.assert_array_equal(llm["lm_head"]["kernel"][:, :vocab], source["lm_head"]["kernel"])
  assert_same(llm["layers"], source["layers"])
  for name in ("vision_model", "mlp1"):
    assert_same(out[name], fresh[name])
  # Step 2 from step 1: every param.
  assert_same(stage.warm_start(fresh, MODEL, out, "step 1"), out)


def test_warm_start_size_mismatches_fail_by_name():
  stage = ChatStage(MODEL, max_len=MAX_LEN)
  fresh = random_like(chat.abstract_params(MODEL), 0)
  wide = vision_preset("tiny", hidden_size=32, num_heads=2, mlp_dim=128)
  with pytest.raises(ValueError, match="vision_model.*differ in size"):
    stage.warm_start(fresh, wide, random_like(
        chat.abstract_params(MODEL.replace(vision=wide))["vision_model"], 1), "vit")
  with pytest.raises(ValueError, match="100-token vocabulary"):
    llm = llama_preset("tiny", vocab_size=100)
    stage.warm_start(fresh, llm, random_like(
        chat.abstract_params(MODEL.replace(llm=llm, image_context_id=99))["language_model"], 1),
                     "llama")
  with pytest.raises(ValueError, match="InternVL-Chat needs"):
    stage.warm_start(fresh, object(), {}, "elsewhere")


def test_forward_flops_match_xla():
  # One ViT block and one LLM layer: XLA counts a scan body once. A ViT wider than the tiny
  # one, so that the elementwise ops XLA also counts stay under 10%.
  model = MODEL.replace(vision=MODEL.vision.replace(num_layers=1, hidden_size=128, mlp_dim=512),
                        select_layer=-1,
                        llm=MODEL.llm.replace(num_layers=1))
  inputs = (jax.ShapeDtypeStruct((1, 2, 48, 48, 3), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, MAX_LEN), jnp.int32))
  forward = jax.jit(lambda p, *x: InternVLChat(model).apply({"params": p}, *x))
  compiled = forward.lower(chat.abstract_params(model), *inputs).compile()
  parts = chat_flops(model, MAX_LEN, tiles=2)
  analytic = sum(parts[name] for name in ("vision", "projector_in", "projector_out", "llm"))
  assert analytic <= compiled.cost_analysis()["flops"] <= 1.1 * analytic


def test_demo_experiment_trains_and_its_params_chat(tmp_path):
  experiment = load_experiment("stage3_sft")
  workdir = str(tmp_path / "run")
  experiment.main(["--workdir", workdir, "--set", "train.steps=2", "--set", "init=()",
                   "--set", "eval.every=None", "--set", "train.global_batch_size=8"])
  assert loading.checkpoint_steps(workdir) == [2]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert losses and all(np.isfinite(losses))
  config, params, tokenizer = loading.load_workdir(workdir)
  assert config == experiment.get_config("demo").train.stage.model
  tiles = np.zeros((1, config.image_size, config.image_size, 3), np.float32)
  answers = Pretrained(config, params, Tokenizer.load(tokenizer)).chat(
      [tiles], ["What shape is shown?"], template="vicuna_v1", max_new_tokens=3)
  assert len(answers) == 1 and isinstance(answers[0], str)
