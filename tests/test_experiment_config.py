"""Experiment configs: `--set` parsing and checking, the presets' optimizers, warm starts between
stages, the workdir's model record and the end-of-run report."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from internvl_jax import loading
from internvl_jax.config import internvl_preset, llama_preset, vision_preset
from internvl_jax.convert import formats
from internvl_jax.data import packing
from internvl_jax.data.config import Source
from internvl_jax.models import internvl, llama, qllama
from internvl_jax.models.lora import ADAPTER_PARAMS
from internvl_jax.optim import OptimizerConfig
from internvl_jax.pretrained import load_pretrained
from internvl_jax.stages.contrastive import TEXT_PARAMS, VISION_PARAMS, ContrastiveStage
from internvl_jax.stages.generative import TRAINABLE_PARAMS, GenerativeStage
from internvl_jax.stages.retrieval import NO_WEIGHT_DECAY, RetrievalStage, layer_decay
from internvl_jax.stages.sft import PROJECTOR_AND_LLM_PARAMS, PROJECTOR_PARAMS
from internvl_jax.train import cli, inputs, loop, report
from internvl_jax.train import config as config_lib
from internvl_jax.train import workdir as workdir_lib
from internvl_jax.train.metrics import METRICS_FILE

import train_fixtures
from train_fixtures import load_experiment

MODEL = internvl_preset("tiny")  # InternVL-G, as stage 2 trains it
STAGE1_MODEL = MODEL.replace(variant="C")


def experiment():
  return config_lib.ExperimentConfig(
      train=train_fixtures.tiny_config(),
      data=config_lib.DataConfig(sources=(Source("pairs"),), tokenizer="tokenizer.model"))


def test_settings_parse_literals_and_bare_strings():
  assert config_lib.parse_settings(["train.steps=200", "eval.tasks=('chat',)", "init=/a/b",
                                    "eval.every=None"]) == {
      "train.steps": 200, "eval.tasks": ("chat",), "init": "/a/b", "eval.every": None}
  with pytest.raises(ValueError, match="expected KEY=VALUE"):
    config_lib.parse_settings(["train.steps"])


def test_overrides_reach_nested_fields_and_keep_types():
  changes = config_lib.parse_settings(
      ["train.steps=200", "train.checkpoint_every=50", "train.optimizer.learning_rate=1",
       "eval.tasks=['zero_shot', 'retrieval']", "init=/ckpt", "data.itm_negatives=batch_hard"])
  config = config_lib.override(experiment(), changes)
  assert (config.train.steps, config.train.checkpoint_every) == (200, 50)
  assert config.data.itm_negatives == "batch_hard"
  assert config.train.optimizer.learning_rate == 1  # an int is a fine float
  assert config.eval.tasks == ("zero_shot", "retrieval")  # a list becomes the field's tuple
  assert config.init == ("/ckpt",)  # one path is a tuple of one


@pytest.mark.parametrize("setting, message", [
    ("train.stepz=3", "Unknown config key 'train.stepz'.*fields are"),
    ("train.steps=many", "train.steps='many'.*takes int"),
    ("train.steps=2.5", "takes int"),
    ("train.async_checkpoints=1", "takes bool"),
    ("train.steps=0", "steps must be at least 1"),
    ("eval.mode='X'", "mode must be 'C' or 'G'"),
    ("data.itm_negatives=hard", "itm_negatives='hard' is not one of"),
    ("data.itg=1", "takes bool"),
])
def test_bad_overrides_name_the_key_and_what_it_takes(setting, message):
  with pytest.raises(ValueError, match=message):
    config_lib.override(experiment(), config_lib.parse_settings([setting]))


def test_training_data_must_be_named():
  with pytest.raises(ValueError, match="sources is empty; name the training data"):
    config_lib.DataConfig(sources=())
  with pytest.raises(TypeError):
    config_lib.DataConfig()  # pylint: disable=no-value-for-parameter


def test_the_pipeline_makes_every_source_and_tokenizer_given_as_a_builder(tmp_path):
  built = []

  def source():
    built.append("source")
    return Source("made", data_dir=str(tmp_path))

  def tokenizer():
    built.append("tokenizer")
    return str(tmp_path / "made.model")

  config = experiment().replace(data=config_lib.DataConfig(
      sources=(source, Source("given", weight=2.0)), tokenizer=tokenizer))
  assert not built  # naming a builder in a config builds nothing
  loader, tokenizer_path = inputs.loader(config)
  assert loader.sources == (Source("made", data_dir=str(tmp_path)), Source("given", weight=2.0))
  assert tokenizer_path == str(tmp_path / "made.model") and built == ["source", "tokenizer"]
  with pytest.raises(ValueError, match="data.tokenizer is not set"):
    inputs.loader(config.replace(data=config_lib.DataConfig(sources=(Source("given"),))))


def test_a_data_option_set_on_the_command_line_reaches_the_pipeline(monkeypatch):
  made = []
  monkeypatch.setattr(inputs.pipeline, "pair_pipeline", made.append)
  monkeypatch.setattr(cli, "run", lambda *args, **kwargs: None)
  load_experiment("stage2_generative").main(["--set", "data.itm_negatives=batch_hard",
                                             "--set", "data.itm_pool_size=64"])
  (pairs,) = made
  assert (pairs.itm_negatives, pairs.itm_pool_size, pairs.itg) == ("batch_hard", 64, True)
  assert not pairs.train_augment and pairs.image_size == 64 and pairs.max_text_len == 32


class _ChatTokenizer:
  """Stands in for the demo's chat tokenizer (building it builds the demo data)."""

  def __init__(self, model):
    self.vocab_size, self._context_id = model.llm.vocab_size, model.image_context_id

  def token_id(self, token):
    return self._context_id


def test_packing_set_on_the_command_line_reaches_the_chat_pipeline(monkeypatch):
  config = load_experiment("stage3_sft").get_config("demo-llama")
  config = config_lib.override(config, config_lib.parse_settings([
      "train.stage.pack_length=512", "train.stage.pack_tiles=4",
      "train.stage.loss_reduction=square", "data.pack_length=512", "data.pack_tiles=4",
      "data.pack_buffer_size=7", "data.tokenizer=tokenizer.model"]))
  config_lib.check_experiment(config)
  config = config.replace(data=dataclasses.replace(config.data, sources=(Source("given"),)))
  made = []
  monkeypatch.setattr(inputs.pipeline, "chat_pipeline", made.append)
  monkeypatch.setattr(inputs.chat, "load_chat_tokenizer",
                      lambda *args: _ChatTokenizer(config.train.stage.model))
  inputs.chat_batches(config)
  (chat,) = made
  assert chat.packing == packing.Packing(pack_length=512, pack_tiles=4, buffer_size=7)
  assert config.train.stage.loss_reduction == "square"


def test_packed_captions_set_on_the_command_line_reach_the_pair_pipeline(monkeypatch):
  config = load_experiment("stage2_generative").get_config("demo")
  config = config_lib.override(config, config_lib.parse_settings([
      "train.stage.pack_length=96", "train.stage.pack_tiles=4", "data.pack_length=96",
      "data.pack_tiles=4", "data.pack_buffer_size=7", "data.tokenizer=tokenizer.model"]))
  config_lib.check_experiment(config)
  config = config.replace(data=dataclasses.replace(config.data, sources=(Source("given"),)))
  made = []
  monkeypatch.setattr(inputs.pipeline, "pair_pipeline", made.append)
  inputs.pair_batches(config)
  (pairs,) = made
  assert pairs.packing == packing.Packing(pack_length=96, pack_tiles=4, buffer_size=7)
  assert config.train.stage.abstract_batch(2)["image"].shape[:2] == (2, 4)


@pytest.mark.parametrize("name, settings, message", [
    ("stage2_generative", ["data.itg=False"],
     r"GenerativeStage trains on \['itg_labels', 'itg_text'\].*e.g. --set data.itg=True"),
    ("stage2_generative", ["data.itm_negatives=none"], "--set data.itm_negatives=batch"),
    ("stage1_contrastive", ["data.itg=True"], "data.itg=True makes .* ContrastiveStage does not"),
    ("retrieval_finetune", ["train.stage.multi_positive=False"],
     "data.image_id='image_hash' makes .*; set it to 'none'"),
    ("stage3_sft", ["data.itm_negatives=batch"], "ChatStage does not train on"),
    ("stage3_sft", ["data.pack_length=320"],
     r"ChatStage does not train on; .*--set train.stage.pack_length=320"),
    ("stage3_sft", ["train.stage.pack_length=320", "data.pack_length=320", "data.pack_tiles=8"],
     "rows of 320 tokens and 40 slots; .*--set data.pack_length=320 --set data.pack_tiles=40"),
    ("stage1_contrastive", ["data.pack_length=64"], "ContrastiveStage does not train on"),
    ("stage2_generative", ["train.stage.pack_length=96", "data.pack_length=96"],
     "rows of 96 tokens and 8 slots; .*--set data.pack_tiles=8"),
    ("stage1_contrastive", ["eval.data=None"], "have no data: set eval.data"),
])
def test_data_options_the_stage_does_not_match_fail_before_anything_is_built(name, settings,
                                                                              message):
  config = load_experiment(name).get_config("demo")
  config_lib.check_experiment(config)
  config = config_lib.override(config, config_lib.parse_settings(settings))
  with pytest.raises(ValueError, match=message):
    config_lib.check_experiment(config)


def _random_params(abstract, seed: int) -> dict:
  """Distinct random values of the params' shapes: what a warm start copies is then visible (and
  nothing compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)


def _internvl(config, seed):
  return _random_params(internvl.abstract_params(config), seed)


def test_stage2_takes_the_towers_from_stage1_and_keeps_its_new_parts_fresh():
  source = _internvl(STAGE1_MODEL, 1)
  fresh = _internvl(MODEL, 2)
  out = GenerativeStage(MODEL, text_len=8).warm_start(fresh, STAGE1_MODEL, source, "stage1")
  for name in ("vision_model", "clip_projector", "text_projection", "logit_scale"):
    jax.tree.map(np.testing.assert_array_equal, out[name], source[name])
  text = qllama.llama_params(out["qllama"], MODEL.qllama)
  jax.tree.map(np.testing.assert_array_equal,
               {k: text[k] for k in source["text_model"]}, source["text_model"])
  for name in ("clip_projector2", "itm_head"):
    jax.tree.map(np.testing.assert_array_equal, out[name], fresh[name])
  np.testing.assert_array_equal(out["qllama"]["query_tokens"], fresh["qllama"]["query_tokens"])
  cross = out["qllama"]["layers"]["layer_0"]["cross_attn"]
  jax.tree.map(np.testing.assert_array_equal, cross,
               fresh["qllama"]["layers"]["layer_0"]["cross_attn"])


def test_stage1_takes_a_pretrained_llama_as_its_text_tower():
  fresh = _internvl(STAGE1_MODEL, 2)
  source = _random_params(llama.abstract_params(MODEL.text), 3)
  out = ContrastiveStage(STAGE1_MODEL, text_len=8).warm_start(fresh, MODEL.text, source, "llama")
  jax.tree.map(np.testing.assert_array_equal, out["text_model"],
               {k: source[k] for k in fresh["text_model"]})
  jax.tree.map(np.testing.assert_array_equal, out["vision_model"], fresh["vision_model"])


def test_warm_starts_from_models_of_another_size_or_kind_fail_by_name():
  wide = STAGE1_MODEL.replace(vision=vision_preset("tiny", hidden_size=32, mlp_dim=64))
  source = _internvl(wide, 1)
  fresh = _internvl(MODEL, 2)
  stage = GenerativeStage(MODEL, text_len=8)
  with pytest.raises(ValueError, match="has shape .* there and .* here: the models differ in size"):
    stage.warm_start(fresh, wide, source, "wide")
  with pytest.raises(ValueError, match="needs a InternVLConfig checkpoint; it holds a LlamaConfig"):
    stage.warm_start(fresh, llama_preset("tiny"), {}, "llama")


def test_a_workdir_checkpoint_loads_as_its_model(tmp_path):
  config = train_fixtures.tiny_config(steps=2)
  workdir = str(tmp_path)
  state = loop.train(config, train_fixtures.InMemoryPairs(), workdir)
  workdir_lib.write_model(workdir, config.stage.model)
  with open(os.path.join(workdir, loading.MODEL_FILE)) as f:
    record = json.load(f)
  assert record["model"] == "internvl_c"
  assert formats.config_from_json(record) == config.stage.model
  model = load_pretrained(workdir)
  assert model.config == config.stage.model and model.is_internvl_c
  jax.tree.map(np.testing.assert_array_equal, model.params, jax.device_get(state.params))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loading.load_arrays(os.path.join(workdir, "missing"))


def test_the_model_record_names_internvl_c_or_g_and_refuses_what_disagrees():
  assert formats.config_to_json(MODEL)["model"] == "internvl_g"
  record = formats.config_to_json(STAGE1_MODEL)
  assert record["model"] == "internvl_c" and formats.config_from_json(record) == STAGE1_MODEL
  with pytest.raises(ValueError, match="'internvl_g' and its config's variant 'C' disagree"):
    formats.config_from_json({**record, "model": "internvl_g"})
  # Files written before the variant: the kind alone names it.
  config = {k: v for k, v in record["config"].items() if k != "variant"}
  assert formats.config_from_json({"model": "internvl_c", "config": config}) == STAGE1_MODEL
  with pytest.raises(ValueError, match='set it to "internvl_c" .* "internvl_g"'):
    formats.config_from_json({"model": "internvl", "config": config})


def test_stages_refuse_the_other_internvl_variant():
  with pytest.raises(ValueError, match="ContrastiveStage trains InternVL-C; this model's variant "
                     "is 'G': build it with variant='C'"):
    ContrastiveStage(MODEL)
  with pytest.raises(ValueError, match="GenerativeStage trains InternVL-G"):
    GenerativeStage(STAGE1_MODEL)
  with pytest.raises(ValueError, match="RetrievalStage trains InternVL-G"):
    RetrievalStage(STAGE1_MODEL)


def _stage1(text_lr: float, warmup_steps: int, total_steps: int) -> dict:
  return dict(learning_rate=1e-3, b2=0.95, weight_decay=0.1, warmup_steps=warmup_steps,
              total_steps=total_steps,
              lr_groups=(("vision", VISION_PARAMS, 1e-3), ("text", TEXT_PARAMS, text_lr)))


_STAGE2 = dict(b2=0.98, weight_decay=0.05)
_RETRIEVAL = dict(weight_decay=0.05, no_weight_decay=NO_WEIGHT_DECAY, grad_clip_norm=1.0)
_SFT = (PROJECTOR_AND_LLM_PARAMS,)
# Each preset's optimizer spelled out (OptimizerConfig's defaults aside), so that deriving the
# presets from their experiment's OPTIMIZER cannot change what a run trains with.
PRESET_OPTIMIZERS = {
    ("stage1_contrastive", "demo"): _stage1(1e-3, 100, 1000),
    ("stage1_contrastive", "gpu"): _stage1(1e-4, 2000, 50_000),
    ("stage1_contrastive", "paper"): _stage1(1e-4, 5000, 175_000),
    ("stage1_contrastive", "paper-224"): _stage1(1e-4, 100, 3052),
    ("stage2_generative", "demo"): dict(
        _STAGE2, learning_rate=1e-3, warmup_steps=100, total_steps=2000,
        trainable=(TRAINABLE_PARAMS, r"^qllama/(lm_head|layers|norm)/")),
    ("stage2_generative", "paper"): dict(_STAGE2, learning_rate=5e-5, warmup_steps=2000,
                                         total_steps=80_000, trainable=(TRAINABLE_PARAMS,)),
    ("stage3_sft", "demo"): dict(learning_rate=2e-3, b2=0.98, warmup_steps=20, total_steps=600,
                                 trainable=_SFT),
    ("stage3_sft", "gpu"): dict(learning_rate=2e-5, warmup_steps=156, total_steps=5198,
                                trainable=_SFT),
    ("stage3_sft", "paper-pretrain"): dict(learning_rate=1e-3, warmup_steps=66, total_steps=2181,
                                           trainable=(PROJECTOR_PARAMS,)),
    ("stage3_sft", "paper"): dict(learning_rate=2e-5, warmup_steps=156, total_steps=5198,
                                  trainable=_SFT),
    # One epoch of LLaVA-Mix-665K at 128 (the LoRA scripts: 16), the recipe's lr and decay.
    ("stage3_sft", "finetune-InternVL2_5-8B"): dict(
        learning_rate=4e-5, weight_decay=0.05, warmup_steps=156, total_steps=5198,
        trainable=(PROJECTOR_PARAMS, r"^language_model/")),
    ("stage3_sft", "finetune-InternVL2_5-8B-lora"): dict(
        learning_rate=4e-5, weight_decay=0.05, warmup_steps=1248, total_steps=41582,
        trainable=(ADAPTER_PARAMS,)),
    ("stage3_sft", "demo-qwen2"): dict(learning_rate=2e-3, b2=0.98, warmup_steps=4,
                                       total_steps=40, trainable=(PROJECTOR_PARAMS,
                                                                  r"^language_model/")),
    ("retrieval_finetune", "demo"): dict(_RETRIEVAL, learning_rate=1e-4, warmup_steps=10,
                                         total_steps=200),
    ("retrieval_finetune", "paper"): dict(_RETRIEVAL, learning_rate=1e-6, warmup_steps=100,
                                          total_steps=1416),
}


@pytest.mark.parametrize("name, preset", sorted(PRESET_OPTIMIZERS))
def test_each_preset_trains_with_its_optimizer(name, preset):
  config = load_experiment(name).get_config(preset)
  expected = PRESET_OPTIMIZERS[name, preset]
  if name == "retrieval_finetune":  # its layer decay follows the model's depth
    expected = dict(expected, layer_decay=layer_decay(config.train.stage.model, 0.9))
  assert config.train.optimizer == OptimizerConfig(**expected)


def test_the_report_summarizes_and_plots_the_whole_history(tmp_path):
  records = [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 3.0},
             {"step": 20, "eval/zero_shot/top1": 55.0}, {"step": 10, "loss": 3.5}]
  with open(tmp_path / METRICS_FILE, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  table = report.report(str(tmp_path), "demo")
  rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
  assert rows["loss"] == ["3.5", "3", "20"]  # step 10 logged again after a resume: the last wins
  assert rows["eval/zero_shot/top1"] == ["55", "20"]
  assert (tmp_path / report.PLOT_FILE).stat().st_size > 1000
