"""Evaluation: the metrics on constructed inputs with known answers, CIDEr / BLEU through
pycocoevalcap, and tools/evaluate.py on tiny InternVL-C, InternVL-G and chat checkpoints over
the demo data."""

import io
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from PIL import Image

import scripts
from internvl_jax import pretrained
from internvl_jax.config import chat_preset, internvl_preset, llama_preset, vision_preset
from internvl_jax.data import demo
from internvl_jax.data import issues
from internvl_jax.data import sources
from internvl_jax.data import templates
from internvl_jax.data.tokenizer import IMAGE_CONTEXT, IMAGE_TOKENS, Tokenizer
from internvl_jax.evaluation import caption_metrics, check_task, evaluate, format_table, metrics
from internvl_jax.evaluation import data as data_lib
from internvl_jax.models import chat as chat_model
from internvl_jax.models.internvl import InternVLC, init_params
from internvl_jax.pretrained import Pretrained

evaluate_tool = scripts.load("tools/evaluate.py")

IMAGE_SIZE = 64  # the demo data's default size: built once and shared with the demo run


# --- metrics on constructed inputs ---------------------------------------------------------------

def test_zero_shot_classifier_averages_normalized_prompts():
  prompts = np.asarray([[[3.0, 0.0], [0.0, 1.0]],    # class 0: two templates of different norms
                        [[0.0, -2.0], [0.0, -5.0]]])  # class 1
  classifier = metrics.zero_shot_classifier(prompts)
  np.testing.assert_allclose(classifier, [[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]], atol=1e-6)


def test_top_k_accuracy_counts_the_rank_of_the_true_class():
  logits = np.asarray([
      [9, 1, 2, 3, 4, 5, 6],  # label 0: rank 0
      [9, 8, 7, 6, 5, 1, 0],  # label 4: rank 4 (top-5, not top-1)
      [9, 8, 7, 6, 5, 4, 0],  # label 6: rank 6 (neither)
      [0, 1, 2, 3, 4, 5, 6],  # label 5: rank 1
  ], np.float32)
  accuracy = metrics.top_k_accuracy(logits, np.asarray([0, 4, 6, 5]), ks=(1, 5))
  assert accuracy == {1: 25.0, 5: 75.0}
  # With fewer classes than k, top-k is every class.
  assert metrics.top_k_accuracy(logits[:, :2], np.asarray([0, 1, 1, 0]), ks=(5,)) == {5: 100.0}


def test_retrieval_recall_with_several_positives_per_image():
  # Text embeddings are the identity, so similarity[i, j] = image_embeddings[i, j].
  similarity = np.asarray([[.9, .1, .0, .0, .0, .0],
                           [.85, .8, .7, .1, .0, .0],
                           [.6, .5, .4, .3, .2, .1]], np.float32)
  positives = np.repeat(np.eye(3, dtype=bool), 2, axis=1)  # two captions per image
  recall = metrics.retrieval_recall(similarity, np.eye(6, dtype=np.float32), positives, ks=(1, 5))
  # i2t: image 0's best positive is first; image 1's (text 2) third; image 2's (text 4) fifth.
  # t2i: texts 1 and 3 have their image second or third; the other four first.
  scores = [recall["i2t_r1"], recall["i2t_r5"], recall["t2i_r1"], recall["t2i_r5"]]
  np.testing.assert_allclose(scores, [100 / 3, 100, 400 / 6, 100])
  assert recall["mean_recall"] == pytest.approx(np.mean(scores))


def test_retrieval_recall_counts_every_image_a_text_is_true_of():
  # Texts 0 and 1 (one caption, two images' own) are true of images 0 and 1: text 0 retrieving
  # image 1 first is a hit, and so is image 1 retrieving text 0 first.
  similarity = np.asarray([[.2, .9, .1], [.9, .1, .0], [.0, .0, .5]], np.float32)
  shared = np.asarray([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  recall = metrics.retrieval_recall(similarity, np.eye(3, dtype=np.float32), shared, ks=(1,))
  assert recall["i2t_r1"] == 100.0 and recall["t2i_r1"] == 100.0
  # With each text a positive of its own image only, the same scores miss: image 0's own text is
  # second, and text 0's image second.
  strict = metrics.retrieval_recall(similarity, np.eye(3, dtype=np.float32), np.eye(3, dtype=bool),
                                    ks=(1,))
  assert strict["i2t_r1"] == pytest.approx(100 / 3) and strict["t2i_r1"] == pytest.approx(100 / 3)
  with pytest.raises(ValueError, match="positives must be"):
    metrics.retrieval_recall(similarity, np.eye(3, dtype=np.float32), shared[:2])


def test_exact_match_normalizes_case_whitespace_and_one_trailing_period():
  assert metrics.normalize_answer("  It is  Red. ") == "it is red"
  assert metrics.exact_match(["it is red", "A circle.", "In the top left", "red"],
                             ["It is red.", "A circle.", "In the top right.", "It is red."]) == 50.0
  with pytest.raises(ValueError, match="predictions"):
    metrics.exact_match(["a"], [])


def test_caption_scores_are_pycocoevalcap_on_the_tokenized_text():
  predictions = ["A red circle, in the top left.", "a blue square", "there is a green star"]
  references = [["a red circle in the top left", "a small red circle"],
                ["A photo of a blue square on a dark background."],
                ["a yellow triangle", "a green star"]]
  scores = caption_metrics.caption_scores(predictions, references)
  gts = {i: [caption_metrics.tokenize(r) for r in refs] for i, refs in enumerate(references)}
  res = {i: [caption_metrics.tokenize(p)] for i, p in enumerate(predictions)}
  assert res[0] == ["a red circle in the top left"]
  assert scores["cider"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
  assert scores["bleu4"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3])

  identical = caption_metrics.caption_scores([refs[0] for refs in references], references)
  unrelated = caption_metrics.caption_scores(["an old man walking a dog"] * 3, references)
  assert identical["cider"] > scores["cider"] > unrelated["cider"]
  assert identical["bleu4"] > unrelated["bleu4"]


def test_format_table_shows_counts_as_integers():
  table = format_table({"chat/exact_match": 12.5, "chat/num_questions": 8.0})
  lines = table.splitlines()
  assert lines[-2].split() == ["chat/exact_match", "12.50"]
  assert lines[-1].split() == ["chat/num_questions", "8"]


# --- demo data -----------------------------------------------------------------------------------

def test_demo_chat_questions_leave_out_the_free_form_description():
  eval_data = data_lib.resolve("demo", "chat", IMAGE_SIZE)
  pairs = [pair for record in data_lib.records(eval_data, 30)
           for pair in eval_data.question_answers(record)]
  assert pairs and all(q != "Describe the image." and "<image>" not in q for q, _ in pairs)
  assert data_lib.resolve("demo", "zero_shot", IMAGE_SIZE).class_names() == demo.CLASS_NAMES


def test_demo_retrieval_positives_are_the_images_a_caption_is_true_of():
  texts = [demo.record_text(0, "test", index) for index in range(200)]
  demo_data = data_lib.resolve("demo", "retrieval", IMAGE_SIZE)
  positives = demo_data.retrieval_positives([set(text["captions"]) for text in texts],
                                            [text["caption"] for text in texts], list(range(200)))
  for j, text in enumerate(texts):
    template = next(t for t in demo.CAPTION_TEMPLATES
                    if demo.fill_caption(t, text["attrs"]) == text["caption"])
    named = [name for name in text["attrs"] if "{" + name + "}" in template]
    expected = [all(other["attrs"][name] == text["attrs"][name] for name in named)
                for other in texts]
    np.testing.assert_array_equal(positives[:, j], expected, err_msg=text["caption"])
  assert positives.diagonal().all() and 2 < positives.sum(0).mean() < 200 / 2
  # COCO-style data: each caption is a positive of its own image only, even if another image has
  # the identical caption.
  coco = data_lib.EvalData("coco_captions", "test", None).retrieval_positives(
      [{"a dog", "a cat"}, {"a dog"}], ["a dog", "a cat", "a dog"], [0, 0, 1])
  np.testing.assert_array_equal(coco, [[1, 1, 0], [0, 0, 1]])


def test_demo_caption_references_are_every_template_with_the_record_caption_first():
  eval_data = data_lib.resolve("demo", "caption", IMAGE_SIZE)
  for record in data_lib.records(eval_data, 5):
    references = data_lib.captions(record)
    assert len(set(references)) == len(references) == 8
    assert references[0] == record["caption"].decode()
    colour, shape = record["class_name"].decode().split()
    assert all(shape in r for r in references)


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
  """A local TFDS dataset shaped like coco_captions / imagenet2012: decoded uint8 images of any
  size, several captions per image, a ClassLabel with underscores in its names."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
      "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
      "label": tfds.features.ClassLabel(names=["red_circle", "blue square", "green star"]),
  })
  rng = np.random.default_rng(0)
  records = lambda: ((str(i), {"image": rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8),
                               "captions": {"text": [f"caption {i}", f"another caption {i}"]},
                               "label": i % 3}) for i in range(5))
  sources.write_dataset("coco_like", {"validation": records}, features, data_dir=data_dir)
  return data_dir


def test_a_local_tfds_dataset_reads_captions_labels_and_decoded_images(coco_like):
  eval_data = data_lib.resolve("tfds:coco_like", "retrieval", IMAGE_SIZE, coco_like)
  assert eval_data.split == "validation" and type(eval_data) is data_lib.EvalData
  assert eval_data.class_names() == ("red circle", "blue square", "green star")
  record = next(data_lib.records(eval_data, 1))
  assert len(data_lib.captions(record)) == 2
  image, conversions = data_lib.decode_image(record["image"])
  pixels = data_lib.pixels(image, IMAGE_SIZE, crop=True)
  assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.dtype == np.float32
  assert conversions == ()
  with pytest.raises(ValueError, match="has splits"):
    data_lib.resolve("tfds:coco_like:test", "retrieval", IMAGE_SIZE, coco_like)


@pytest.mark.parametrize("shape, mode", [
    ((6, 5), "L"), ((6, 5, 1), "L"), ((6, 5, 2), "LA"), ((6, 5, 4), "RGBA")])
def test_decode_image_converts_arrays_of_every_channel_count_as_pil_does(shape, mode):
  array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  image, conversions = data_lib.decode_image(array)
  expected = Image.fromarray(array.reshape(shape[:2]) if mode == "L" else array).convert("RGB")
  np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
  assert conversions == (issues.converted_from(mode),)


def test_decode_image_converts_encoded_modes_and_skips_unusable_arrays():
  buffer = io.BytesIO()
  Image.new("CMYK", (5, 4), (0, 255, 0, 0)).save(buffer, "JPEG")
  image, conversions = data_lib.decode_image(buffer.getvalue())
  assert image.mode == "RGB" and conversions == (issues.converted_from("CMYK"),)
  for array in (np.zeros((6, 5, 5), np.uint8), np.zeros((6, 5, 3), np.float32)):
    with pytest.raises(issues.SkipRecord) as error:
      data_lib.decode_image(array)
    assert error.value.reason == issues.IMAGE_UNDECODABLE


# --- checkpoints and tools/evaluate.py -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.load(demo.ensure_tokenizer())


def _internvl_config(tokenizer):
  return internvl_preset("tiny", vision=vision_preset("tiny", image_size=IMAGE_SIZE),
                         text=llama_preset("tiny", vocab_size=tokenizer.vocab_size))


@pytest.fixture(scope="module")
def internvl_g_dir(tokenizer, tmp_path_factory):
  """A tiny InternVL-G checkpoint with the demo tokenizer."""
  config = _internvl_config(tokenizer)
  directory = str(tmp_path_factory.mktemp("internvl_g"))
  Pretrained(config, init_params(config), tokenizer).save(directory)
  return directory


@pytest.fixture(scope="module")
def internvl_c(tokenizer):
  """Tiny InternVL-C params as stage 1 trains them (a `text_model` text tower)."""
  config = _internvl_config(tokenizer).replace(variant="C")
  return Pretrained(config, init_params(config), tokenizer)


@pytest.fixture(scope="module")
def chat_dir(tokenizer, tmp_path_factory):
  chat_tokenizer = Tokenizer(tokenizer.model_proto,
                             IMAGE_TOKENS + templates.TEMPLATES["vicuna_v1"].special_tokens)
  config = chat_preset("tiny-v1.5", image_size=IMAGE_SIZE,
                       llm=llama_preset("tiny", vocab_size=chat_tokenizer.vocab_size),
                       image_context_id=chat_tokenizer.token_id(IMAGE_CONTEXT))
  directory = str(tmp_path_factory.mktemp("chat"))
  Pretrained(config, chat_model.init_params(config), chat_tokenizer).save(directory)
  return directory


def _run_tool(tmp_path, *args) -> dict:
  output = str(tmp_path / "results.json")
  assert evaluate_tool.main([*args, "--output", output]) == 0
  with open(output) as f:
    return json.load(f)


def test_tool_runs_zero_shot_retrieval_and_caption_on_internvl_g(internvl_g_dir, tmp_path, capsys):
  results = _run_tool(tmp_path, "--checkpoint", internvl_g_dir, "--task", "zero_shot",
                      "--task", "retrieval", "--task", "caption", "--mode", "G", "--limit", "6",
                      "--batch-size", "4")
  assert results["zero_shot/num_examples"] == 6 and results["zero_shot/num_classes"] == 36
  assert results["retrieval/num_images"] == 6 and results["retrieval/num_texts"] == 6
  assert results["caption/num_examples"] == 6
  for name in ("zero_shot/top1", "zero_shot/top5", "retrieval/i2t_r1", "retrieval/t2i_r10",
               "retrieval/mean_recall"):
    assert 0 <= results[name] <= 100
  assert results["zero_shot/top5"] >= results["zero_shot/top1"]
  assert results["retrieval/i2t_r10"] == 100.0  # 6 images: every text is in the top 10
  assert results["caption/baseline_cider"] > 0 and results["caption/cider"] >= 0
  assert "caption/bleu4" in results and "caption/baseline_bleu4" in results
  assert "retrieval/mean_recall" in capsys.readouterr().out


def test_evaluate_runs_zero_shot_and_retrieval_on_internvl_c(internvl_c, coco_like):
  results = {**evaluate(internvl_c, "zero_shot", "demo", limit=5, batch_size=4),
             **evaluate(internvl_c, "retrieval", "demo", limit=5, batch_size=4)}
  assert set(results) >= {"zero_shot/top1", "zero_shot/top5", "retrieval/i2t_r1",
                          "retrieval/i2t_r5", "retrieval/t2i_r1", "retrieval/t2i_r5"}
  # COCO-like: five images with two captions each; three classes, so top-5 is every class.
  tfds_data = "tfds:coco_like"
  retrieval = evaluate(internvl_c, "retrieval", tfds_data, batch_size=4, data_dir=coco_like)
  assert retrieval["retrieval/num_images"] == 5 and retrieval["retrieval/num_texts"] == 10
  assert retrieval["retrieval/i2t_r10"] == 100.0  # 10 texts: every image's positives in the top 10
  assert 0 <= retrieval["retrieval/i2t_r1"] <= retrieval["retrieval/i2t_r5"] <= 100
  zero_shot = evaluate(internvl_c, "zero_shot", tfds_data, batch_size=4, data_dir=coco_like)
  assert zero_shot["zero_shot/num_classes"] == 3 and zero_shot["zero_shot/top5"] == 100.0


def test_tool_runs_chat(chat_dir, tmp_path):
  # One question per demo record, some "Describe the image." (not scored): the first 4 have one.
  results = _run_tool(tmp_path, "--checkpoint", chat_dir, "--task", "chat", "--limit", "4")
  assert results["chat/num_questions"] >= 1 and 0 <= results["chat/exact_match"] <= 100


@pytest.mark.parametrize("model, args, message", [
    ("G", ("--task", "chat"), "chat needs an InternVL-Chat model"),
    ("chat", ("--task", "retrieval"), "needs an InternVL-C or -G model"),
    ("G", ("--task", "zero_shot", "--data", "flickr"), "data must be"),
])
def test_tool_says_why_a_task_cannot_run(model, args, message, internvl_g_dir, chat_dir, capsys):
  checkpoint = chat_dir if model == "chat" else internvl_g_dir
  with pytest.raises(SystemExit) as exit_info:
    evaluate_tool.main(["--checkpoint", checkpoint, *args, "--limit", "2"])
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("task, mode, message", [
    ("chat", "C", "chat needs an InternVL-Chat model"),
    ("caption", "C", "captioning needs InternVL-G"),
    ("zero_shot", "G", "zero_shot with mode G needs InternVL-G"),
])
def test_internvl_c_refuses_what_needs_internvl_g_or_chat(task, mode, message, internvl_c):
  with pytest.raises(ValueError, match=message):
    check_task(internvl_c, task, mode)


def test_captioning_without_a_tokenizer_is_refused(internvl_g_dir):
  model = pretrained.load_pretrained(internvl_g_dir)
  with pytest.raises(ValueError, match="tokenizer"):
    evaluate(Pretrained(model.config, model.params), "caption", "demo", limit=2)


# --- Pretrained on InternVL-C params, and evaluation during training -----------------------------

def test_pretrained_encodes_with_internvl_c_params(internvl_c):
  model, config, params = internvl_c, internvl_c.config, internvl_c.params
  pixels = np.random.default_rng(0).normal(size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  expected = InternVLC(config).apply({"params": params}, pixels, method=InternVLC.encode_image)
  np.testing.assert_allclose(model.encode_image(pixels, mode="C"), expected, atol=1e-6)
  assert model.encode_text(["a red circle"]).shape == (1, config.embed_dim)
  with pytest.raises(ValueError, match="InternVL-G"):
    model.encode_image(pixels, mode="G")
  with pytest.raises(ValueError, match="InternVL-G"):
    model.caption(pixels)


def test_evaluate_on_sharded_params_compiles_once_and_matches(internvl_c, tokenizer):
  config, params = internvl_c.config, internvl_c.params
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  host = evaluate(Pretrained(config, params, tokenizer), "retrieval", "demo", limit=7,
                  batch_size=4)
  cache_size = pretrained._encode_image._cache_size()
  live = evaluate(Pretrained(config, sharded, tokenizer), "retrieval", "demo", limit=5,
                  batch_size=4)
  again = evaluate(Pretrained(config, sharded, tokenizer), "retrieval", "demo", limit=7,
                   batch_size=4)
  assert again == pytest.approx(host, abs=1e-4) and live["retrieval/num_images"] == 5
  # Padded batches: the sharded params add at most one compilation, the limits none.
  assert pretrained._encode_image._cache_size() <= cache_size + 1
