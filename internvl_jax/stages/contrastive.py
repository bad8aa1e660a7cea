"""Stage 1 (spec 4.1): InternVL-C trained with the CLIP loss over the global batch.

Batches hold "image" (B, S, S, 3) float32, "text" (B, L) int32 right-padded with the pad id, and
"valid" (B,) bool (False on padding rows of a final partial batch: left out of the loss's
average). FLIP token dropping keeps `keep_fraction` of the patches in training; the paper trains
at 196 px with half the tokens dropped, on position embeddings stored for 224 px.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import flops, losses
from internvl_jax.config import InternVLConfig, LlamaConfig, VisionConfig
from internvl_jax.models import internvl, qllama
from internvl_jax.models.internvl import InternVLC
from internvl_jax.train import warm_start

# Paper stage 1: peak lr 1e-3 for the image encoder, 1e-4 for the text encoder (both heads go
# with their tower; the temperature with the image side).
VISION_PARAMS = r"^(vision_model|clip_projector)/|^logit_scale$"
TEXT_PARAMS = r"^(text_model/|text_projection$)"


@dataclasses.dataclass(frozen=True)
class ContrastiveStage:
  model: InternVLConfig
  image_size: int | None = None  # input resolution; None: the model's (vision.image_size)
  text_len: int = 80  # tokens per caption, BOS and EOS included
  keep_fraction: float = 1.0  # FLIP: the share of patch tokens kept in training
  max_logit_scale: float | None = float(np.log(100.0))

  def __post_init__(self):
    self.model.require_variant("C", "ContrastiveStage")
    patch = self.model.vision.patch_size
    if self.image_size is not None and self.image_size % patch:
      raise ValueError(f"ContrastiveStage: image_size {self.image_size} is not a multiple of the "
                       f"patch size {patch}.")
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(f"ContrastiveStage: keep_fraction must be in (0, 1], got "
                       f"{self.keep_fraction}.")

  @property
  def input_size(self) -> int:
    return self.model.vision.image_size if self.image_size is None else self.image_size

  @property
  def _module(self) -> InternVLC:
    return InternVLC(self.model)

  def init(self, rng):
    return internvl.init_variables(self.model, rng)["params"]

  def encode(self, params, batch, rng, train: bool = True):
    masking, dropout = jax.random.split(rng)
    mask = batch["text"] != self.model.text.pad_id
    image, text, _ = self._module.apply(
        {"params": params}, batch["image"], batch["text"], mask, train=train,
        keep_fraction=self.keep_fraction, rngs={"masking": masking, "dropout": dropout})
    return {"image": image, "text": text}

  def loss(self, params, features, batch):
    return losses.clip_softmax_loss(features["image"], features["text"], params["logit_scale"],
                                    max_logit_scale=self.max_logit_scale, valid=batch["valid"])

  def abstract_batch(self, batch_size: int):
    size, channels = self.input_size, self.model.vision.num_channels
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32),
            "text": jax.ShapeDtypeStruct((batch_size, self.text_len), jnp.int32),
            "valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

  def flops_per_example(self) -> int:
    size = self.input_size
    return 3 * flops.internvl_c_forward_flops(self.model, (size, size), self.text_len,
                                              self.keep_fraction)

  def count_tokens(self, batch) -> int:
    return int(np.sum(np.asarray(batch["text"]) != self.model.text.pad_id))

  def warm_start(self, params, source_config, source_params, source):
    """From InternVL-C (e.g. the 196 px phase), InternVL-G (its LLaMA weights as the text tower),
    a pretrained InternViT (the vision tower) or a pretrained LLaMA (the text tower: the paper
    starts from multilingual LLaMA-7B)."""
    warm_start.require(source_config, (InternVLConfig, VisionConfig, LlamaConfig), source,
                       "InternVL-C")
    if isinstance(source_config, VisionConfig):
      return warm_start.graft(params, {"vision_model": source_params}, source)
    if isinstance(source_config, LlamaConfig):
      text = {name: source_params[name] for name in params["text_model"]}
      return warm_start.graft(params, {"text_model": text}, source)
    parts = {name: source_params[name] for name in params if name in source_params}
    if source_config.variant == "G":
      text = qllama.llama_params(source_params["qllama"], source_config.qllama)
      parts["text_model"] = {name: text[name] for name in params["text_model"]}
    return warm_start.graft(params, parts, source)
