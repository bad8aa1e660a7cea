"""InternVL-Chat: transformers parity, pixel shuffle, splicing, the three variants' vision sides,
projector sizes, and chat generation through the generic search."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from scipy.special import erf

from internvl_jax import generate
from internvl_jax.config import chat_preset, llama_preset
from internvl_jax.convert import chat_layouts
from internvl_jax.models import chat, llama
from internvl_jax.models.intern_vit import InternViT, select_layer
from internvl_jax.models.qllama import QLlama
from chat_fixtures import CONTEXT, batch, export, random_params, transformers_logits


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tiles, tile_count, tokens, mask):
  return chat.InternVLChat(config).apply({"params": params}, tiles, tile_count, tokens, mask)


# Pixel shuffle.

def _reference_pixel_shuffle(x: np.ndarray, scale: float, version: str) -> np.ndarray:
  """The reference's view / permute sequence (spec 4.4c), transcribed to numpy."""
  n, w, h, c = x.shape
  x = x.reshape(n, w, int(h * scale), int(c / scale))
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
  return x if version == "v1" else x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_matches_the_reference_element_by_element(version):
  # Distinct values that encode (row, column, channel), so the mapping is checked, not just sums.
  rows, cols, channels = np.meshgrid(np.arange(6), np.arange(6), np.arange(3), indexing="ij")
  grid = (100 * rows + 10 * cols + channels)[None].astype(np.float32)
  grid = np.concatenate([grid, grid + 1000])  # two images
  ours = np.asarray(chat.pixel_shuffle(jnp.asarray(grid), 0.5, version))
  np.testing.assert_array_equal(ours, _reference_pixel_shuffle(grid, 0.5, version))
  # v2: output [i, j] concatenates input [2i + a, 2j + b] over (a, b) = 00, 01, 10, 11;
  # v1 holds the same block at [j, i].
  for i in range(3):
    for j in range(3):
      block = np.concatenate([grid[:, 2 * i + a, 2 * j + b] for a in (0, 1) for b in (0, 1)], -1)
      np.testing.assert_array_equal(ours[:, i, j] if version == "v2" else ours[:, j, i], block)
  quarter = np.asarray(chat.pixel_shuffle(jnp.asarray(np.tile(grid, (1, 2, 2, 1))), 0.25, version))
  np.testing.assert_array_equal(quarter, _reference_pixel_shuffle(np.tile(grid, (1, 2, 2, 1)), 0.25,
                                                                   version))


# Splicing.

def test_splice_writes_each_rows_features_over_its_image_tokens_in_order():
  tokens = np.array([[1, CONTEXT, CONTEXT, 5, CONTEXT], [CONTEXT, 2, 3, 0, 0]], np.int32)
  embeddings = np.zeros((2, 5, 3), np.float32)
  features = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3) + 1
  out = np.asarray(chat.splice(embeddings, tokens, CONTEXT, features, np.array([3, 1])))
  np.testing.assert_array_equal(out[0, [1, 2, 4]], features[0, :3])
  np.testing.assert_array_equal(out[1, 0], features[1, 0])
  np.testing.assert_array_equal(out[tokens != CONTEXT], 0.0)


def test_splice_names_rows_whose_counts_differ():
  tokens = np.array([[CONTEXT, CONTEXT, 3], [CONTEXT, 2, 3]], np.int32)
  features = np.ones((2, 4, 3), np.float32)
  with pytest.raises(ValueError, match=r"row 1: 1 tokens, 2 features"):
    chat.splice(np.zeros((2, 3, 3)), tokens, CONTEXT, features, np.array([2, 2]))
  with pytest.raises(ValueError, match=r"row 0: 2 tokens, 0 features"):
    chat.check_image_tokens(tokens, CONTEXT, np.array([0, 1]))


def test_the_model_refuses_bad_batches_before_computing():
  config = chat_preset("tiny-v1.5")
  tiles, tile_count, tokens, mask = batch(config)
  model = chat.InternVLChat(config)
  with pytest.raises(ValueError, match=r"row 0: 8 tokens, 4 features"):
    model.apply({"params": {}}, tiles, np.array([1, 1], np.int32), tokens, mask)
  with pytest.raises(ValueError, match=r"tiles must be \(batch, tiles, 32, 32, 3\)"):
    model.apply({"params": {}}, tiles[:, 0], tile_count, tokens, mask)
  with pytest.raises(ValueError, match=r"disagree on the batch size"):
    model.apply({"params": {}}, tiles, tile_count[:1], tokens, mask)


# transformers parity (v1.5: pixel shuffle v2, the projector's LayerNorm).

@pytest.fixture(scope="module", params=[
    chat_preset("tiny-v1.5"),
    # The hidden states path, GQA and tied embeddings.
    chat_preset("tiny-v1.5", select_layer=-2,
                llm=llama_preset("tiny", num_kv_heads=2, tie_embeddings=True)),
], ids=["last-layer", "layer-2-gqa-tied"])
def hf_model(request, tmp_path_factory):
  config = request.param
  params = random_params(config)
  directory = tmp_path_factory.mktemp("internvl_chat_hf")
  export(config, params, directory, chat_layouts.TRANSFORMERS)
  reference, info = transformers.InternVLForConditionalGeneration.from_pretrained(
      str(directory), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  return config, params, reference.eval()


def test_logits_match_transformers_with_spliced_images(hf_model):
  config, params, reference = hf_model
  tiles, tile_count, tokens, mask = batch(config)
  theirs = transformers_logits(reference, tiles, tile_count, tokens, mask)
  ours = _logits(config, params, tiles, tile_count, tokens, mask)
  assert ours.shape == theirs.shape and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-5, rtol=1e-5)


# The vision sides of the three variants, composed by hand from the parts.

def _mlp(params, x):
  """The projector in numpy (float64): [LayerNorm eps 1e-5 ->] Linear -> erf GELU -> Linear."""
  x = np.asarray(x, np.float64)
  if "norm" in params:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
  h = x @ params["linear_1"]["kernel"] + params["linear_1"]["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return h @ params["linear_2"]["kernel"] + params["linear_2"]["bias"]


@functools.partial(jax.jit, static_argnums=0)
def _vision_parts(config, params, tiles):
  """The ViT's selected patch tokens and, for "qllama", QLLaMA's query outputs, run separately."""
  vit = InternViT(config.vision).apply({"params": params["vision_model"]}, tiles,
                                       return_hidden_states=True)
  queries = None
  if config.variant == "qllama":
    queries = QLlama(config.qllama).apply({"params": params["qllama"]}, None, None,
                                          vit.last_hidden_state, mode="image").queries
  return select_layer(vit, config.select_layer)[:, 1:], queries


@pytest.mark.parametrize("preset", ["tiny-v1.0", "tiny-qllama", "tiny-v1.5"])
def test_tile_features_are_the_variants_composition(preset):
  config = chat_preset(preset)
  params = random_params(config)
  tiles = batch(config)[0][0]
  ours = jax.jit(lambda p, t: chat.InternVLChat(config).apply(
      {"params": p}, t, method=chat.InternVLChat.encode_tiles))(params, tiles)
  patches, queries = _vision_parts(config, params, tiles)
  patches = np.asarray(patches)
  if config.variant == "v1.5":
    grid = config.grid_size
    patches = _reference_pixel_shuffle(patches.reshape(2, grid, grid, -1), 0.5, config.ps_version)
    patches = patches.reshape(2, -1, patches.shape[-1])
  expected = _mlp(params["mlp1"], patches)
  if config.variant == "qllama":  # [queries; patches]
    expected = np.concatenate([_mlp(params["mlp2"], queries), expected], axis=1)
  assert ours.shape == (2, config.num_image_tokens, config.llm.hidden_size)
  np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)


def test_logits_are_the_llm_on_spliced_embeddings():
  config = chat_preset("tiny-qllama")
  params = random_params(config)
  tiles, tile_count, tokens, mask = batch(config)
  features = jax.jit(lambda p, t: chat.InternVLChat(config).apply(
      {"params": p}, t, method=chat.InternVLChat.encode_tiles))(params, tiles.reshape(
          (4,) + tiles.shape[2:]))
  features = np.asarray(features).reshape(2, 2 * config.num_image_tokens, -1)
  embeddings = np.asarray(params["language_model"]["embed_tokens"]["embedding"])[tokens]
  for row, count in enumerate(tile_count * config.num_image_tokens):
    embeddings[row, tokens[row] == CONTEXT] = features[row, :count]
  expected = jax.jit(lambda p, e, m: llama.Llama(config.llm).apply({"params": p}, None, m,
                                                                   embeddings=e).logits)(
      params["language_model"], embeddings, mask)
  ours = _logits(config, params, tiles, tile_count, tokens, mask)
  np.testing.assert_allclose(ours[mask], expected[mask], atol=1e-5, rtol=1e-5)


# Sizes.

def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset, projectors, expected", [
    ("v1.0-vicuna-7b", ("mlp1",), 29_892_608),  # 3200*4096 + 4096 + 4096*4096 + 4096: 29.9M
    ("v1.0-vicuna-13b", ("mlp1",), 42_608_640),  # 42.6M
    ("qllama-vicuna-7b", ("mlp1", "mlp2"), 63_455_232),  # two_mlp: 63.5M (paper: 64M trainable)
    ("qllama-vicuna-13b", ("mlp1", "mlp2"), 89_804_800),  # 89.8M (paper: 90M)
    ("v1.1-llama2-13b", ("mlp1",), 91_786_240),  # LayerNorm(12800) + 12800->5120->5120: 91.78M
])
def test_projector_parameter_counts_are_the_papers(preset, projectors, expected):
  params = chat.abstract_params(chat_preset(preset))
  assert _count({name: params[name] for name in projectors}) == expected


def test_paper_presets_token_counts_and_bad_configs():
  assert chat_preset("v1.0-vicuna-7b").num_image_tokens == 576  # 336 px, patch 14
  assert chat_preset("qllama-vicuna-13b").num_image_tokens == 96 + 576
  assert chat_preset("v1.1-llama2-13b").num_image_tokens == 256  # per 448 tile
  with pytest.raises(ValueError, match="select_layer -4 is out of range for the 3 hidden states"):
    chat_preset("tiny-v1.5", select_layer=-4)
  with pytest.raises(ValueError, match="variant 'qllama' needs a qllama config"):
    chat_preset("tiny-v1.0", variant="qllama")
  with pytest.raises(ValueError, match="image_context_id 128 is outside"):
    chat_preset("tiny-v1.5", image_context_id=128)
  with pytest.raises(ValueError, match="does not split into 2x2 blocks"):
    chat_preset("tiny-v1.5", image_size=24)
  with pytest.raises(ValueError, match="template='chatml' is not one of"):
    chat_preset("tiny-v1.5", template="chatml")
  with pytest.raises(ValueError, match="need 1 <= min_dynamic_patch <= max_dynamic_patch, got 0, 6"):
    chat_preset("tiny-v1.5", min_dynamic_patch=0)
  with pytest.raises(ValueError, match="Unknown chat preset"):
    chat_preset("v2.0")


def test_every_param_names_its_logical_axes():
  config = chat_preset("tiny-qllama")
  variables = jax.eval_shape(
      lambda *x: chat.InternVLChat(config).init(jax.random.key(0), *x),
      *chat._example_inputs(config))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(variables)["params"]
  P = jax.sharding.PartitionSpec
  assert specs["mlp2"]["linear_1"]["kernel"] == P("embed", "mlp")
  assert specs["mlp1"]["linear_2"]["kernel"] == P("mlp", "embed")


def test_gradients_reach_the_llm_the_projector_and_the_vision_tower():
  config = chat_preset("tiny-v1.5")
  params = random_params(config)
  tiles, tile_count, tokens, mask = batch(config)
  loss = lambda p: jnp.sum(chat.InternVLChat(config).apply(
      {"params": p}, tiles, tile_count, tokens, mask)[mask]**2)
  grads = jax.jit(jax.grad(loss))(params)
  for path in (("language_model", "embed_tokens", "embedding"), ("mlp1", "norm", "scale"),
               ("vision_model", "embeddings", "patch_embed", "kernel")):
    grad = np.asarray(functools.reduce(lambda tree, key: tree[key], path, grads))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0, path
  # The empty slot's pixels feed nothing.
  pixel_grad = jax.jit(jax.grad(lambda t: jnp.sum(chat.InternVLChat(config).apply(
      {"params": params}, t, tile_count, tokens, mask)[mask]**2)))(tiles)
  assert np.abs(pixel_grad[1, 1]).max() == 0 and np.abs(pixel_grad[1, 0]).max() > 0


# Generation.

def test_greedy_chat_equals_the_full_forward_argmax():
  config = chat_preset("tiny-v1.5")
  params = random_params(config)
  tiles, tile_count, prompt, mask = batch(config)
  context = {"tiles": tiles, "tile_count": tile_count}
  decoder = chat.ChatDecoder(config)
  search = dict(max_new_tokens=5, eos_id=config.llm.eos_id, pad_id=config.llm.pad_id)
  generated = np.asarray(generate.greedy_search(decoder, params, prompt, mask, context, **search))
  for row in range(2):
    length = int(mask[row].sum())
    tokens = np.concatenate([prompt[row, :length], generated[row]])[None]
    logits = _logits(config, params, tiles[row:row + 1], tile_count[row:row + 1], tokens,
                     np.ones_like(tokens, bool))
    predicted = np.argmax(np.asarray(logits[0, length - 1:-1]), axis=-1)
    ended = np.flatnonzero(generated[row] == config.llm.eos_id)
    stop = ended[0] + 1 if ended.size else len(predicted)
    np.testing.assert_array_equal(generated[row, :stop], predicted[:stop])
  beams, scores = generate.beam_search(decoder, params, prompt, mask, context, num_beams=1,
                                       **search)
  np.testing.assert_array_equal(beams, generated)
  assert np.isfinite(scores).all()
