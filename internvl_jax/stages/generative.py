"""Stage 2 (spec 4.2, 9): InternVL-G trained with ITC + ITM + ITG, each with weight 1.

Only the new parts train: QLLaMA's queries and cross-attention blocks, `clip_projector2`, the ITM
head and the temperature; InternViT, the LLaMA weights, `clip_projector` and `text_projection`
stay frozen (and hold no optimizer state).

Batches (`data.pipeline.pair_pipeline` with `itm_negatives` set and `itg=True`) hold "image"
(B, S, S, 3) float32; "text" (B, L) int32, "summarize:" + caption (the ITC text, and the ITM
positive); "itm_text" (B, L) a negative caption per row; "itm_label" (B,) int32, 1 where the ITM
row uses its own caption; "itg_text" / "itg_labels" (B, L) "English caption:" + caption and its
next-token labels; "valid" (B,) bool (False on padding rows: left out of every loss).

`backbone_itc` adds a second ITC term against the same text features with InternVL-C's image
embedding (`clip_projector` of InternViT's tokens), as the reference's retrieval fine-tune does
(spec 4.3). The paper's stage 2 has none: its text tower is frozen, so InternVL-C's alignment,
which InternVL-G's image embedding adds to its own (spec 3.3), cannot drift. A stage that also
trains the text tower (the demo's, which was never a language model) needs the term to keep it.

With packing (`pack_length`, `data/packing.py`) a batch row holds up to `pack_tiles` pairs
(slots) whose ITG captions share one row of `pack_length` tokens: "image" (B, K, S, S, 3),
"text" / "itm_text" (B, K, L), "itm_label" (B, K), "slot_valid" (B, K) bool (False on empty
slots), and "itg_text" / "itg_labels" / "itg_slots" (B, P), the last the caption's slot (1..K, 0 on
padding). ITM and ITC run on the pairs as without packing; the packed captions run as QLLaMA's
packed "itg" rows, each caption seeing only its own image's queries, at its own positions.

Every loss is exact under feature-cached accumulation: the ITM label travels with its row, and
ITG keeps per-row sums of token losses and token counts, so its mean is over the whole batch:
the mean over every caption token of the batch, as the reference's cross-entropy, packed or not.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import flops, losses
from internvl_jax.config import InternVLConfig
from internvl_jax.data.tokenizer import IGNORE_LABEL
from internvl_jax.models import internvl, llama, qllama
from internvl_jax.models.internvl import InternVLG
from internvl_jax.train import warm_start

# The params stage 2 trains (spec 4.2); every other param is frozen.
TRAINABLE_PARAMS = (r"^qllama/query_tokens$|^qllama/layers/[^/]+/cross_attn/|^clip_projector2/|"
                    r"^itm_head/|^logit_scale$")


@dataclasses.dataclass(frozen=True)
class GenerativeStage:
  model: InternVLConfig
  text_len: int = 80  # tokens per text, BOS and EOS (and any prefix) included
  max_logit_scale: float | None = float(np.log(100.0))
  backbone_itc: bool = False  # also ITC of InternVL-C's image embedding (see above)
  # ITG scores this many vocabulary columns at a time (`losses.chunked_lm_example_losses`).
  loss_block_size: int = 8192
  # Packed ITG captions (see above): rows of pack_tiles pairs and pack_length caption tokens, as
  # data.pack_length and data.pack_tiles make them; None: one pair and caption per row.
  pack_length: int | None = None
  pack_tiles: int = 8

  @property
  def input_size(self) -> int:
    return self.model.vision.image_size

  def __post_init__(self):
    self.model.require_variant("G", "GenerativeStage")
    if self.pack_length is not None and self.pack_length < self.text_len:
      raise ValueError(f"GenerativeStage: pack_length {self.pack_length} is shorter than a "
                       f"caption's text_len {self.text_len}.")
    if self.pack_tiles < 1:
      raise ValueError(f"GenerativeStage: pack_tiles must be at least 1, got {self.pack_tiles}.")

  @property
  def packed(self) -> bool:
    return self.pack_length is not None

  def _pairs(self, x):
    """A (B, ...) array of pairs, from a packed row's (B, K, ...) ones: (B x K, ...)."""
    return x.reshape((-1,) + x.shape[2:]) if self.packed else x

  def _pair_valid(self, batch):
    if not self.packed:
      return batch["valid"]
    return self._pairs(batch["valid"][:, None] & batch["slot_valid"])

  @property
  def _module(self) -> InternVLG:
    return InternVLG(self.model)

  def init(self, rng):
    return internvl.init_variables(self.model, rng)["params"]

  def encode(self, params, batch, rng, train: bool = True):
    pairs = {key: self._pairs(batch[key]) for key in ("image", "text", "itm_text", "itm_label")}
    itm_text = jnp.where(pairs["itm_label"][:, None] == 1, pairs["text"], pairs["itm_text"])
    texts = [itm_text, pairs["text"]]
    packed_itg = None
    if self.packed:
      packed_itg = (batch["itg_text"], batch["itg_slots"])
    else:
      texts.append(batch["itg_text"])
    tokens = jnp.stack(texts)
    out = self._module.apply({"params": params}, pairs["image"], tokens,
                             tokens != self.model.text.pad_id, train=train, return_logits=False,
                             packed_itg=packed_itg, rngs={"dropout": rng})
    itg_nll, itg_tokens = losses.chunked_lm_example_losses(
        out.itg_text, llama.head_kernel(self.model.text, params["qllama"]), batch["itg_labels"],
        block_size=self.loss_block_size, ignore_index=IGNORE_LABEL, valid=batch["valid"])
    per_pair = {"image": out.image_features, "text": out.text_features,
                "itm_logits": out.itm_logits}
    if self.backbone_itc:
      per_pair["backbone"] = out.backbone_features
    # Features keep the batch's leading axis, which accumulation splits.
    rows = batch["valid"].shape[0]
    features = {name: x.reshape((rows, -1) + x.shape[1:]) if self.packed else x
                for name, x in per_pair.items()}
    return features | {"itg_nll": itg_nll, "itg_tokens": itg_tokens.astype(jnp.float32)}

  def loss(self, params, features, batch):
    valid = self._pair_valid(batch)
    pairs = {name: self._pairs(features[name]) for name in features if not name.startswith("itg")}
    itc, metrics = losses.clip_softmax_loss(
        pairs["image"], pairs["text"], params["logit_scale"],
        max_logit_scale=self.max_logit_scale, valid=valid)
    itm, itm_metrics = losses.itm_loss(pairs["itm_logits"], self._pairs(batch["itm_label"]), valid)
    itg = jnp.sum(features["itg_nll"]) / jnp.maximum(jnp.sum(features["itg_tokens"]), 1.0)
    metrics.update(itm_metrics, itc_loss=itc, itm_loss=itm, itg_loss=itg)
    total = itc + itm + itg
    if self.backbone_itc:
      backbone, _ = losses.clip_softmax_loss(
          pairs["backbone"], pairs["text"], params["logit_scale"],
          max_logit_scale=self.max_logit_scale, valid=valid)
      metrics["backbone_itc_loss"] = backbone
      total += backbone
    return total, metrics

  def abstract_batch(self, batch_size: int):
    size, channels = self.input_size, self.model.vision.num_channels
    pairs = (batch_size, self.pack_tiles) if self.packed else (batch_size,)
    pair_text = jax.ShapeDtypeStruct(pairs + (self.text_len,), jnp.int32)
    itg_text = jax.ShapeDtypeStruct((batch_size, self.pack_length or self.text_len), jnp.int32)
    batch = {"image": jax.ShapeDtypeStruct(pairs + (size, size, channels), jnp.float32),
             "text": pair_text, "itm_text": pair_text, "itg_text": itg_text, "itg_labels": itg_text,
             "itm_label": jax.ShapeDtypeStruct(pairs, jnp.int32),
             "valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}
    if self.packed:
      batch |= {"itg_slots": itg_text, "slot_valid": jax.ShapeDtypeStruct(pairs, jnp.bool_)}
    return batch

  def flops_per_example(self) -> int:
    """Of a batch row: a pair, or a packed row of `pack_tiles` pairs (attention over the whole
    packed caption row)."""
    size = self.input_size
    packing = (self.pack_tiles, self.pack_length) if self.packed else None
    return flops.internvl_g_stage2_training_flops(self.model, (size, size), self.text_len,
                                                  self.backbone_itc, packing)

  def count_tokens(self, batch) -> int:
    """The text tokens of the three text batches, as the model sees them."""
    itm = np.where(np.asarray(batch["itm_label"])[..., None] == 1, batch["text"],
                   batch["itm_text"])
    pad = self.model.text.pad_id
    pair_tokens = sum(np.sum(np.asarray(t) != pad, axis=-1) for t in (itm, batch["text"]))
    if not self.packed:
      return int(np.sum(pair_tokens) + np.sum(np.asarray(batch["itg_text"]) != pad))
    return int(np.sum(pair_tokens * batch["slot_valid"]) + np.sum(batch["itg_slots"] > 0))

  def warm_start(self, params, source_config, source_params, source):
    """From stage 1 (InternVL-C: InternViT, `clip_projector`, `text_projection`, the temperature,
    and the text tower as QLLaMA's LLaMA weights; queries and cross-attention stay new) or from
    InternVL-G (every param, e.g. the released InternVL-14B)."""
    warm_start.require(source_config, (InternVLConfig,), source, "InternVL-G")
    parts = {name: source_params[name] for name in params if name in source_params}
    if source_config.variant == "C":
      parts["qllama"] = qllama.with_llama_params(params["qllama"], source_params["text_model"],
                                                 self.model.qllama)
    return warm_start.graft(params, parts, source)
