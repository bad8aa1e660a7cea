"""Where the demo's captioner loses the shape's position: linear probes along the way.

  python tools/position_probe.py runs/stage2_generative      # or a stage-1 workdir
  python tools/position_probe.py CHECKPOINT --train 2000 --test 500

Ridge-regression probes (one-hot targets, fit on demo train images, scored on test images) of the
shape's row, column and cell of the 3x3 grid, from
  "patches under the shape": InternViT's last-block patch tokens averaged over the patches the
      shape covers (found from the pixels: the shapes are saturated colours on grey), what a
      cross-attention attending to the shape alone could read;
  "all patches": the same tokens averaged over every patch, a pooling without positions of its own;
  "query outputs": QLLaMA's query outputs, flattened (InternVL-G only), what the captions and
      InternVL-G's image embedding are made from.
Chance is 33% for the row and the column, 11% for the cell. For InternVL-G it also prints where
the first cross-attention block looks (`cross_attention_weights`): the weights' entropy against
a uniform attention's, and their mass on the CLS token and on the patches under the shape.

`--block-steps N` also trains a fresh QLLaMA cross-attention block (the model's queries, heads and
width) with a linear head on the cell itself, over the frozen ViT tokens (AdamW at the demo stage
2's peak lr 1e-3, held constant; batch 64), and prints its test accuracy four times along the
way: how readable the position is to the block when it is the whole objective (a minute, against
a stage-2 run's eight).
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import internvl_jax
from internvl_jax.config import QLlamaConfig
from internvl_jax.data import demo
from internvl_jax.evaluation import data as data_lib
from internvl_jax.models import layers, qllama
from internvl_jax.models.internvl import InternVLG

# A pixel belongs to the shape when its channels differ by more than this: the demo's shape
# colours differ by over 90 between channels, its backgrounds are grey (0).
_SATURATION = 40
_BATCH = 250


def shape_fraction(image: np.ndarray, patch_size: int) -> np.ndarray:
  """(patches,) the fraction of each patch's pixels that are the shape's, in raster order."""
  pixels = np.asarray(image, np.int32)
  shape = (pixels.max(-1) - pixels.min(-1)) > _SATURATION
  grid = shape.shape[0] // patch_size
  return shape.reshape(grid, patch_size, grid, patch_size).mean((1, 3)).reshape(-1)


def ridge_probe(train_x, train_y, test_x, test_y, num_classes: int, l2: float = 1e-2) -> float:
  """Test accuracy of a ridge regression onto one-hot labels over standardized features."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  a = design(np.asarray(train_x, np.float64))
  weights = np.linalg.solve(a.T @ a + l2 * len(a) * np.eye(a.shape[1]),
                            a.T @ np.eye(num_classes)[train_y])
  return float(np.mean((design(np.asarray(test_x, np.float64)) @ weights).argmax(1) == test_y))


def demo_split(split: str, count: int, image_size: int, patch_size: int):
  """(pixels (count, size, size, 3) normalized, cells (count,) 0-8, shape fractions)."""
  pixels, cells, fractions = [], [], []
  for index in range(count):
    text, image = demo.record_with_image(0, split, index, image_size)
    pixels.append(data_lib.pixels(image, image_size, crop=False))
    cells.append(demo.POSITIONS.index(text["attrs"]["position"]))
    fractions.append(shape_fraction(image, patch_size))
  return np.stack(pixels), np.asarray(cells), np.stack(fractions)


@functools.partial(jax.jit, static_argnames=("config",))
def _query_outputs(config, params, tokens):
  """QLLaMA's query outputs from InternViT's last tokens (CLS included), as InternVL-G reads."""
  queries = lambda model, tokens: model.qllama(None, None, tokens, mode="image").queries
  return InternVLG(config).apply({"params": params}, tokens, method=queries)


@functools.partial(jax.jit, static_argnames=("config",))
def cross_attention_weights(config, params, tokens) -> jax.Array:
  """(images, heads, queries, tokens) softmax weights of QLLaMA's first cross-attention block.

  Its query inputs are the queries after layer 0's self-attention among themselves, the same for
  every image (the queries have seen no image yet); later blocks' would need the layers between.
  """
  qllama_params = params["qllama"]
  layer_params = jax.tree.map(lambda a: a[0], qllama_params["layers"]["layer_0"])
  queries = jnp.broadcast_to(qllama_params["query_tokens"],
                             (len(tokens),) + qllama_params["query_tokens"].shape[1:])

  def weights(layer, queries, vision):
    mask, positions = qllama.attention_mask_and_positions(
        "image", jnp.ones((len(queries), 0), bool), queries.shape[1])
    x, _ = layer.attention_step(queries, mask, positions, None, None)
    attn = layer.cross_attn
    q = attn.query(attn.norm1(x))
    k, _ = attn.keys_values(attn.norm2(vision))
    return jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1]**-0.5, axis=-1)

  qcfg = config.qllama
  layer = qllama.CrossAttentionDecoderLayer(qcfg.text, qcfg.num_queries)
  return layer.apply({"params": layer_params}, queries, tokens, method=weights)


def attention_focus(weights: np.ndarray, fractions: np.ndarray) -> str:
  """One line on (images, heads, queries, 1 + patches) weights over [CLS; patches]."""
  under_shape = fractions > 0.3  # patches at least 30% covered by the shape
  entropy = -(weights * np.log(np.maximum(weights, 1e-12))).sum(-1).mean()
  on_shape = (weights[..., 1:] * under_shape[:, None, None, :]).sum(-1).mean()
  return (f"cross-attention (block 0): entropy {entropy:.2f} nats (uniform "
          f"{np.log(weights.shape[-1]):.2f}); mass on CLS {100 * weights[..., 0].mean():.1f}%, on "
          f"the patches under the shape {100 * on_shape:.1f}% (they are "
          f"{100 * under_shape.mean():.1f}% of the patches)")


class CellReader(nn.Module):
  """Fresh queries, one QLLaMA cross-attention block as stage 2 starts it, and a linear head from
  the normed query outputs onto the 9 cells."""

  config: QLlamaConfig

  @nn.compact
  def __call__(self, vision: jax.Array) -> jax.Array:
    text = self.config.text
    queries = self.param("query_tokens", nn.initializers.normal(0.02),
                         (1, self.config.num_queries, text.hidden_size))
    queries = jnp.broadcast_to(queries, (len(vision),) + queries.shape[1:])
    queries = queries + qllama.CrossAttention(text.num_heads, text.head_dim, text.hidden_size,
                                              norm_eps=text.norm_eps)(queries, vision)
    queries = layers.RMSNorm(text.norm_eps)(queries)
    return nn.Dense(9)(queries.reshape(len(queries), -1))


def train_cell_reader(config: QLlamaConfig, train_tokens, train_cells, test_tokens, test_cells,
                      steps: int, batch_size: int = 64, seed: int = 0) -> list[tuple[int, float]]:
  """(step, test cell accuracy) four times over `steps` of a `CellReader` trained on the cells."""
  reader = CellReader(config)
  params = nn.meta.unbox(reader.init(jax.random.key(seed), jnp.asarray(train_tokens[:1])))
  # The demo stage 2's betas, weight decay and peak lr, held constant: a fixed yardstick for
  # comparing ViTs, not a replay of that stage's schedule.
  optimizer = optax.adamw(1e-3, 0.9, 0.98, weight_decay=0.05)

  @jax.jit
  def step(params, opt_state, tokens, cells):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        reader.apply(p, tokens), cells).mean()
    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  accuracy = jax.jit(lambda p, tokens, cells: jnp.mean(reader.apply(p, tokens).argmax(-1) == cells))
  opt_state, rng, history = optimizer.init(params), np.random.default_rng(seed), []
  evaluated_at = {max(1, steps * quarter // 4) for quarter in range(1, 5)}
  for i in range(1, steps + 1):
    rows = rng.integers(0, len(train_tokens), batch_size)
    params, opt_state = step(params, opt_state, train_tokens[rows], train_cells[rows])
    if i in evaluated_at:
      history.append((i, 100 * float(accuracy(params, test_tokens, test_cells))))
  return history


def representations(model, pixels: np.ndarray, fractions: np.ndarray):
  """(name -> (images, features) array for every representation the model has, InternViT's last
  tokens)."""
  tokens = np.concatenate([np.asarray(model.vision_features(pixels[i:i + _BATCH]))
                           for i in range(0, len(pixels), _BATCH)])
  weights = fractions / np.maximum(fractions.sum(1, keepdims=True), 1e-6)
  features = {"patches under the shape": np.einsum("bp,bpd->bd", weights, tokens[:, 1:]),
              "all patches": tokens[:, 1:].mean(1)}
  if not model.is_internvl_c:
    queries = np.concatenate([np.asarray(_query_outputs(model.config, model.params,
                                                        tokens[i:i + _BATCH]))
                              for i in range(0, len(tokens), _BATCH)])
    features["query outputs"] = queries.reshape(len(queries), -1)
  return features, tokens


def probe(path: str, train: int, test: int, block_steps: int = 0) -> str:
  """The table of probe accuracies (%) for the model at `path`."""
  model = internvl_jax.load_pretrained(path)
  size, patch = model.config.vision.image_size, model.config.vision.patch_size
  pixels, train_cells, fractions = demo_split("train", train, size, patch)
  train_features, train_tokens = representations(model, pixels, fractions)
  pixels, test_cells, fractions = demo_split("test", test, size, patch)
  test_features, test_tokens = representations(model, pixels, fractions)
  lines = [f"{'from':26s} {'row':>6s} {'column':>7s} {'cell':>6s}"]
  for name in train_features:
    scores = [100 * ridge_probe(train_features[name], target(train_cells), test_features[name],
                                target(test_cells), classes)
              for target, classes in ((lambda c: c // 3, 3), (lambda c: c % 3, 3),
                                      (lambda c: c, 9))]
    lines.append(f"{name:26s} {scores[0]:6.1f} {scores[1]:7.1f} {scores[2]:6.1f}")
  if not model.is_internvl_c:
    weights = np.concatenate([
        np.asarray(cross_attention_weights(model.config, model.params, test_tokens[i:i + _BATCH]))
        for i in range(0, len(test_tokens), _BATCH)])
    lines.append(attention_focus(weights, fractions))
  if block_steps:
    history = train_cell_reader(model.config.qllama, train_tokens, train_cells, test_tokens,
                                test_cells, block_steps)
    lines.append("cross-attention block trained on the cell, test %: " +
                 ", ".join(f"{accuracy:.1f} at step {step}" for step, accuracy in history))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("path", help="a stage-1 or stage-2 demo workdir, or a checkpoint")
  parser.add_argument("--train", type=int, default=2000, help="train images to fit the probes")
  parser.add_argument("--test", type=int, default=500, help="test images to score them")
  parser.add_argument("--block-steps", type=int, default=0,
                      help="also train a fresh cross-attention block on the cell, so many steps")
  args = parser.parse_args(argv)
  print(probe(args.path, args.train, args.test, args.block_steps))


if __name__ == "__main__":
  main()
