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

Every loss is exact under feature-cached accumulation: the ITM label travels with its row, and
ITG keeps per-row sums of token losses and token counts, so its mean is over the whole batch.
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

  @property
  def input_size(self) -> int:
    return self.model.vision.image_size

  def __post_init__(self):
    self.model.require_variant("G", "GenerativeStage")

  @property
  def _module(self) -> InternVLG:
    return InternVLG(self.model)

  def init(self, rng):
    return internvl.init_variables(self.model, rng)["params"]

  def encode(self, params, batch, rng, train: bool = True):
    itm_text = jnp.where(batch["itm_label"][:, None] == 1, batch["text"], batch["itm_text"])
    tokens = jnp.stack([itm_text, batch["text"], batch["itg_text"]])
    out = self._module.apply({"params": params}, batch["image"], tokens,
                             tokens != self.model.text.pad_id, train=train, return_logits=False,
                             rngs={"dropout": rng})
    itg_nll, itg_tokens = losses.chunked_lm_example_losses(
        out.itg_text, llama.head_kernel(self.model.text, params["qllama"]), batch["itg_labels"],
        block_size=self.loss_block_size, ignore_index=IGNORE_LABEL, valid=batch["valid"])
    features = {"image": out.image_features, "text": out.text_features,
                "itm_logits": out.itm_logits, "itg_nll": itg_nll,
                "itg_tokens": itg_tokens.astype(jnp.float32)}
    if self.backbone_itc:
      features["backbone"] = out.backbone_features
    return features

  def loss(self, params, features, batch):
    valid = batch["valid"]
    itc, metrics = losses.clip_softmax_loss(
        features["image"], features["text"], params["logit_scale"],
        max_logit_scale=self.max_logit_scale, valid=valid)
    itm, itm_metrics = losses.itm_loss(features["itm_logits"], batch["itm_label"], valid)
    itg = jnp.sum(features["itg_nll"]) / jnp.maximum(jnp.sum(features["itg_tokens"]), 1.0)
    metrics.update(itm_metrics, itc_loss=itc, itm_loss=itm, itg_loss=itg)
    total = itc + itm + itg
    if self.backbone_itc:
      backbone, _ = losses.clip_softmax_loss(
          features["backbone"], features["text"], params["logit_scale"],
          max_logit_scale=self.max_logit_scale, valid=valid)
      metrics["backbone_itc_loss"] = backbone
      total += backbone
    return total, metrics

  def abstract_batch(self, batch_size: int):
    size, channels = self.input_size, self.model.vision.num_channels
    text = jax.ShapeDtypeStruct((batch_size, self.text_len), jnp.int32)
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32),
            "text": text, "itm_text": text, "itg_text": text, "itg_labels": text,
            "itm_label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

  def flops_per_example(self) -> int:
    size = self.input_size
    return flops.internvl_g_stage2_training_flops(self.model, (size, size), self.text_len,
                                                  self.backbone_itc)

  def count_tokens(self, batch) -> int:
    """The text tokens of the three text batches, as the model sees them."""
    itm = np.where(np.asarray(batch["itm_label"])[:, None] == 1, batch["text"], batch["itm_text"])
    pad = self.model.text.pad_id
    return int(sum(np.sum(np.asarray(t) != pad) for t in (itm, batch["text"], batch["itg_text"])))

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
