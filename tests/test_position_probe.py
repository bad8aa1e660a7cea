"""tools/position_probe.py: the shape's patches found from the pixels, the ridge probe, and the
table for a stage-2 (InternVL-G) checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax.config import internvl_preset, vision_preset
from internvl_jax.data import demo
from internvl_jax.models import qllama
from internvl_jax.models.internvl import init_params
from internvl_jax.pretrained import Pretrained
from tools import position_probe


def test_the_shape_covers_the_patches_of_its_position():
  centers = (np.arange(8) + 0.5) / 8  # patch centers as fractions of the side
  for index in range(20):
    text, image = demo.record_with_image(0, "test", index, 64)
    fraction = position_probe.shape_fraction(np.asarray(image), 8).reshape(8, 8)
    row, col = divmod(demo.POSITIONS.index(text["attrs"]["position"]), 3)
    # The shape's nominal center: its third of the image, kept 0.22 (half its extent) from the
    # edges; it is drawn within 1/24 of there.
    cy, cx = np.clip((np.array([row, col]) + 0.5) / 3, 0.22, 0.78)
    distance = np.maximum(np.abs(centers[:, None] - cy), np.abs(centers[None, :] - cx))
    assert fraction.max() > 0.5, index
    assert np.all(distance[fraction > 0.5] < 0.3), index
    # Backgrounds are grey: patches beyond the shape's reach count none of its pixels.
    assert np.all(fraction[distance > 0.35] == 0), index


def test_ridge_probe_reads_a_linear_label_and_not_a_random_one():
  rng = np.random.default_rng(0)
  labels = rng.integers(3, size=1200)
  features = rng.normal(size=(1200, 16))
  features[np.arange(1200), labels] += 3.0  # each class one direction of the features
  assert position_probe.ridge_probe(features[:900], labels[:900], features[900:], labels[900:],
                                    3) > 0.95
  shuffled = rng.permutation(labels)
  assert position_probe.ridge_probe(features[:900], shuffled[:900], features[900:], shuffled[900:],
                                    3) < 0.45


def test_probe_table_has_the_query_outputs_of_internvl_g(tmp_path, capsys):
  config = internvl_preset("tiny", vision=vision_preset("tiny", image_size=32))
  Pretrained(config, init_params(config)).save(str(tmp_path / "g"))
  position_probe.main([str(tmp_path / "g"), "--train", "60", "--test", "30", "--block-steps", "4"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ["from", "row", "column", "cell"]
  rows = {line[:26].strip(): [float(v) for v in line[26:].split()] for line in lines[1:-2]}
  assert list(rows) == ["patches under the shape", "all patches", "query outputs"]
  for name, scores in rows.items():
    # Accuracies in percent of 30 test images, to one decimal.
    assert all(0 <= s <= 100 and abs(s * 0.3 - round(s * 0.3)) < 0.05 for s in scores), name
  assert lines[-2].startswith("cross-attention (block 0): entropy ")
  assert lines[-1].startswith("cross-attention block trained on the cell, test %: ")
  assert [part.split(" at step ")[1] for part in lines[-1].split(": ")[1].split(", ")] == [
      "1", "2", "3", "4"]


def test_the_cell_reader_learns_a_position_that_its_tokens_carry():
  # Ten tokens per image, each with its own fixed position vector; the "shape" marks one of the
  # first nine, and the label is which. Only attention to the marked token recovers it.
  config = internvl_preset("tiny").qllama
  rng = np.random.default_rng(0)
  positions = rng.normal(size=(10, config.vision_width))
  marker = 3.0 * rng.normal(size=config.vision_width)

  def split(count):
    cells = rng.integers(0, 9, count)
    tokens = positions + 0.3 * rng.normal(size=(count, 10, config.vision_width))
    tokens[np.arange(count), cells] += marker
    return tokens.astype(np.float32), cells

  history = position_probe.train_cell_reader(config, *split(2000), *split(300), steps=200)
  assert [step for step, _ in history] == [50, 100, 150, 200]
  assert history[-1][1] > 80, history  # chance: 11%


def test_cross_attention_weights_are_the_ones_the_block_uses():
  config = internvl_preset("tiny")
  params = init_params(config)
  # Sharpen the attention (scaled query projection), so that wrong weights give other outputs.
  layer_params = params["qllama"]["layers"]["layer_0"]
  q_proj = layer_params["cross_attn"]["q_proj"]
  q_proj["kernel"] = q_proj["kernel"] * 40.0
  vision = np.random.default_rng(0).normal(size=(3, 17, config.vision.hidden_size))
  weights = position_probe.cross_attention_weights(config, params, jnp.asarray(vision, jnp.float32))
  assert weights.shape == (3, config.text.num_heads, config.num_queries, 17)
  assert float(weights.max(-1).mean()) > 0.15  # far from uniform (1/17 = 0.06)

  def outputs(layer, queries, vision):
    mask, positions = qllama.attention_mask_and_positions(
        "image", jnp.ones((len(queries), 0), bool), queries.shape[1])
    x, _ = layer.attention_step(queries, mask, positions, None, None)
    _, v = layer.cross_attn.keys_values(layer.cross_attn.norm2(vision))
    from_weights = layer.cross_attn.o_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v))
    return layer.cross_attn(x, vision), from_weights

  qcfg = config.qllama
  queries = jnp.broadcast_to(params["qllama"]["query_tokens"],
                             (3,) + params["qllama"]["query_tokens"].shape[1:])
  expected, from_weights = qllama.CrossAttentionDecoderLayer(qcfg.text, qcfg.num_queries).apply(
      {"params": jax.tree.map(lambda a: a[0], layer_params)}, queries,
      jnp.asarray(vision, jnp.float32), method=outputs)
  np.testing.assert_allclose(from_weights, expected, rtol=1e-4, atol=1e-5)
