"""Retrieval fine-tuning (spec 4.3): the released `internvl_stage2_retrieval` recipe.

InternVL-G with ITM + ITC only (no ITG), every param trainable. Following the reference's
`InternVLModel.forward` (internvl_g/internvl/model/internvl_stage2_retrieval):

  ITM: every image against its negative caption (label 0) and its own caption (label 1), the
       mean over queries of `itm_head`; cross-entropy averaged over all 2B rows.
  ITC: two symmetric contrastive terms against the same text features (QLLaMA "itc" mode, the
       last real token through `text_projection`): one with `clip_projector2` of the query
       outputs (InternVL-G's), one with `clip_projector` of InternViT's tokens (InternVL-C's).
       Targets are multi-positive: every row sharing the image id is a positive, weighted
       uniformly (BLIP's `pos_idx / pos_idx.sum(1)`); one caption per image gives the diagonal.
       Each term is the mean of its image->text and text->image cross-entropies.
  loss = ITM + ITC_G + ITC_C, each with weight 1, as the reference sums them
       (`loss_itc = (t2i + i2t) / 2 + (backbone_t2i + backbone_i2t) / 2; loss = itm + itc`).

Batches (`data.pipeline.pair_pipeline` with `itm_negatives` set and `image_id` set) hold "image"
(B, S, S, 3) float32; "text" (B, L) int32, "summarize:" + caption (the ITC text and the ITM
positive, as stage 2 here; the reference's ITM texts lack the prefix); "itm_text" (B, L) a
negative caption per row; "image_id" (B,) int32 (with `multi_positive`); "valid" (B,) bool
(False on padding rows: neither rows nor columns of any loss).

Exact under feature-cached accumulation: `encode` keeps per-row ITM logits and per-row
normalized features, and `loss` scores the whole (global) batch, so each row is scored against
every column of the global batch, as the reference's all-gather does.

Where the spec is silent this follows the reference code: no clamp on the temperature (it trains
at lr 1e-6 x 0.9^33), padding handled as above (the reference has none).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import flops, losses, optim
from internvl_jax.config import InternVLConfig
from internvl_jax.models import internvl
from internvl_jax.models.internvl import InternVLG, l2_normalize
from internvl_jax.models.interpolate import resize_pos_embed
from internvl_jax.train import warm_start

# QLLaMA's pass: the negative ITM texts, the positive ITM texts, the ITC texts.
_MODES = ("itm", "itm", "itc")

# The reference decays every param but 1-D ones and biases (`trainer_monkey_patch.py`), so
# unlike `optim.NO_WEIGHT_DECAY` it decays the position embedding, CLS token, queries and the
# temperature. LayerScale and norm scales are 1-D there (stacked over layers here).
NO_WEIGHT_DECAY = (r"bias$", r"(^|/)scale$", r"(^|/)ls[12]$")


def layer_decay(model: InternVLConfig, rate: float) -> tuple[optim.LayerDecay, ...]:
  """The reference's layer ids (`trainer_monkey_patch.py`), L_v = ViT layers + 2 and
  L_q = QLLaMA layers + 2: ViT embeddings 0, block i i + 1, `clip_projector` L_v; QLLaMA
  embeddings, `query_tokens` and `logit_scale` 0, layer i i + 1, every other QLLaMA param,
  `clip_projector2`, `itm_head` and `text_projection` L_q; scale rate^(L - id - 1)."""
  vision = optim.LayerDecay(rate, model.vision.num_layers, prefix=r"^(vision_model|clip_projector)/")
  qllama = optim.LayerDecay(
      rate, model.text.num_layers,
      prefix=r"^(qllama/|clip_projector2/|itm_head/|text_projection$|logit_scale$)",
      first=r"^qllama/embed_tokens/|^qllama/query_tokens$|^logit_scale$",
      blocks=r"^qllama/layers/layer_(?P<offset>\d+)/",
      layers_per_block=model.cross_attention_frequency)
  return vision, qllama


def _forward(model: InternVLG, pixels, tokens, attention_mask, train: bool):
  """Per-row features: `tokens` (3, B, L) in `_MODES` order."""
  vision, queries, text = model.text_batches(pixels, tokens, attention_mask, _MODES, train=train)
  itm = jnp.mean(model.itm_head(queries[:2]).astype(jnp.float32), axis=2)  # (2, B, 2)
  return {"itm_logits": jnp.swapaxes(itm, 0, 1),  # (B, [negative, positive], 2)
          "image": l2_normalize(model.clip_projector2(queries[2])),
          "backbone": l2_normalize(model.clip_projector(vision)),
          "text": model.project_text(text[2], attention_mask[2])}


@dataclasses.dataclass(frozen=True)
class RetrievalStage:
  model: InternVLConfig  # vision.image_size is the fine-tuning resolution (364 in the paper)
  text_len: int = 80  # tokens per text, BOS and EOS (and "summarize:") included
  multi_positive: bool = True  # batches carry "image_id"; False: one caption per image
  max_logit_scale: float | None = None

  @property
  def input_size(self) -> int:
    return self.model.vision.image_size

  def __post_init__(self):
    self.model.require_variant("G", "RetrievalStage")

  def init(self, rng):
    return internvl.init_variables(self.model, rng)["params"]

  def encode(self, params, batch, rng, train: bool = True):
    tokens = jnp.stack([batch["itm_text"], batch["text"], batch["text"]])
    return InternVLG(self.model).apply(
        {"params": params}, batch["image"], tokens, tokens != self.model.text.pad_id, train,
        rngs={"dropout": rng}, method=_forward)

  def loss(self, params, features, batch):
    valid = batch["valid"]
    ids = batch["image_id"] if self.multi_positive else jnp.arange(valid.shape[0])
    positives = (ids[:, None] == ids[None, :]) & valid[None, :] & valid[:, None]
    itc, metrics = losses.multi_positive_clip_loss(
        features["image"], features["text"], params["logit_scale"], positives, valid,
        max_logit_scale=self.max_logit_scale)
    backbone, _ = losses.multi_positive_clip_loss(
        features["backbone"], features["text"], params["logit_scale"], positives, valid,
        max_logit_scale=self.max_logit_scale)
    labels = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), valid.shape + (2,))
    itm, itm_metrics = losses.itm_loss(features["itm_logits"].reshape(-1, 2), labels.reshape(-1),
                                       jnp.repeat(valid, 2))
    metrics.update(itm_metrics, itc_loss=itc, backbone_itc_loss=backbone, itm_loss=itm)
    return itm + itc + backbone, metrics

  def abstract_batch(self, batch_size: int):
    size, channels = self.input_size, self.model.vision.num_channels
    text = jax.ShapeDtypeStruct((batch_size, self.text_len), jnp.int32)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32),
             "text": text, "itm_text": text,
             "valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}
    if self.multi_positive:
      batch["image_id"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return batch

  def flops_per_example(self) -> int:
    """Stage 2's forward (`clip_projector` included) without the ITG logits, with the ITM head on
    a second text batch; every param trains, so backward is twice forward."""
    model, size = self.model, self.input_size
    d = model.text.hidden_size
    forward = flops.internvl_g_stage2_forward_flops(model, (size, size), self.text_len)
    forward -= 2 * self.text_len * d * model.text.vocab_size
    forward += 2 * model.num_queries * d * 2
    return flops.training_flops(forward)

  def count_tokens(self, batch) -> int:
    """The text tokens of the three text batches (negative, positive, ITC), as the model sees
    them."""
    pad = self.model.text.pad_id
    return int(np.sum(np.asarray(batch["itm_text"]) != pad) +
               2 * np.sum(np.asarray(batch["text"]) != pad))

  def warm_start(self, params, source_config, source_params, source):
    """From InternVL-G, every param: stage 2's workdir or the released InternVL-14B. Position
    embeddings stored for another resolution are resized bicubically (224 -> 364 in the paper)."""
    warm_start.require(source_config, (InternVLConfig,), source, "retrieval fine-tuning")
    missing = sorted(set(params) - set(source_params))
    if missing:
      hint = (" It is an InternVL-C checkpoint: train stage 2 (InternVL-G) from it first."
              if source_config.variant == "C" else "")
      raise ValueError(f"Warm start from {source}: retrieval fine-tuning takes every param of "
                       f"InternVL-G; the source lacks {missing}.{hint}")
    parts = {name: source_params[name] for name in params}
    parts["vision_model"] = _with_pos_embed_like(
        source_params["vision_model"], params["vision_model"]["embeddings"]["pos_embed"])
    return warm_start.graft(params, parts, source)


def _with_pos_embed_like(vision: dict, target: np.ndarray) -> dict:
  """`vision` with its position embedding resized to `target`'s grid, if it differs."""
  embeddings = vision["embeddings"]
  if np.shape(embeddings["pos_embed"]) == np.shape(target):
    return vision
  grid = int(round((np.shape(target)[1] - 1)**0.5))
  resized = resize_pos_embed(jnp.asarray(embeddings["pos_embed"]), (grid, grid))
  return {**vision, "embeddings": {**embeddings, "pos_embed": np.asarray(resized)}}
