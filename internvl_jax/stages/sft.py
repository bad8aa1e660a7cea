"""Stage 3 (spec 4.4): InternVL-Chat supervised fine-tuning, the mean next-token loss over the
assistant answers of a batch.

Batches (`data.pipeline.chat_pipeline`) hold "tiles" (B, T, S, S, 3) float32 with "tile_count"
(B,) real ones per row; "tokens" / "labels" (B, L) int32, labels IGNORE_LABEL off the answers;
"token_mask" (B, L) bool; "valid" (B,) bool (False on padding rows: no loss). With packing
(`pack_length`, `data/packing.py`) a row holds several conversations: "segment_ids" (B, L) int32
in place of "token_mask", the decoder's packed attention mask, and "tiles" (B, pack_tiles, ...).

What trains is the optimizer's `trainable` regexes (frozen params hold no optimizer state and get
no gradient); `Freeze` spells the official fine-tuning switches as such regexes. The v1.0 recipe
trains in two steps: the projector alone (`PROJECTOR_PARAMS`), then the projector and the LLM
(`PROJECTOR_AND_LLM_PARAMS`). With `ChatConfig.lora` the model has LoRA adapters
(`models/lora.py`) beside its frozen weights.

The loss is the official weighted mean (chat spec 6.4) over the answer tokens of the whole batch:
sum(w * nll) / sum(w), each answer token weighted by `loss_reduction` from its conversation's
number n of answer tokens: "token" 1 (every token alike), "sample" 1/n (every conversation
alike), "square" 1/sqrt(n). The denominator is the whole batch's, as the official
`loss_reduction_all_gather`; it is exact under feature-cached accumulation, `encode` keeping
per-row sums. A conversation is a packed row's segment, or an unpacked row.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from internvl_jax import flops, losses
from internvl_jax.config import ChatConfig, InternVLConfig, LlamaConfig, LoraConfig, VisionConfig
from internvl_jax.data import templates
from internvl_jax.data.tokenizer import IGNORE_LABEL, IMAGE_TOKENS
from internvl_jax.models import llama, lora
from internvl_jax.models.chat import InternVLChat
from internvl_jax.train import warm_start

# v1.0 step 1 trains the projector(s) only; step 2 the projector(s) and the LLM.
PROJECTOR_PARAMS = r"^mlp[12]/"
PROJECTOR_AND_LLM_PARAMS = r"^(mlp[12]|language_model)/"
LOSS_REDUCTIONS = ("token", "sample", "square")


@dataclasses.dataclass(frozen=True)
class Freeze:
  """The official fine-tuning switches (chat spec 6.1), as the optimizer's regexes (`masks`).

  A tower with LoRA adapters trains them and not its own weights (PEFT freezes what it wraps);
  `unfreeze_vision_layers` k != 0 then trains the ViT blocks [k:] whole, a Python slice as the
  official `unfreeze_vit_layers`: -k the last k blocks, +k the blocks from k on.
  """

  vision: bool = True  # freeze_backbone
  projector: bool = False  # freeze_mlp
  llm: bool = False  # freeze_llm
  unfreeze_vision_layers: int = 0  # unfreeze_vit_layers

  def masks(self, lora_config: LoraConfig | None = None) -> dict:
    """`trainable` and `trainable_layers` of an `OptimizerConfig`."""
    vision_lora = lora_config is not None and lora_config.vision_rank > 0
    llm_lora = lora_config is not None and lora_config.llm_rank > 0
    towers = ((r"^vision_model/", self.vision or vision_lora), (PROJECTOR_PARAMS, self.projector),
              (r"^language_model/", self.llm or llm_lora))
    trainable = tuple(pattern for pattern, frozen in towers if not frozen)
    if lora_config is not None:
      trainable += (lora.ADAPTER_PARAMS,)
    layers = (((r"^vision_model/blocks/", self.unfreeze_vision_layers),)
              if self.unfreeze_vision_layers else ())
    return {"trainable": trainable, "trainable_layers": layers}


# Fields that say how a model runs or is prompted, not what its params are: a fine-tune may set
# them unlike the checkpoint it starts from.
_RUN_FIELDS = ("dtype", "remat_policy", "drop_path_rate", "drop_path_schedule", "lora", "template",
               "system_message", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
               "max_dynamic_patch")


def _check_same_model(model, source_model, source: str, prefix: str = "") -> None:
  """Raises naming the first field in which a chat checkpoint's config differs from the
  preset's, e.g. a Qwen2 checkpoint under a preset of InternLM2."""
  for field in dataclasses.fields(model):
    name, ours, theirs = field.name, getattr(model, field.name), getattr(source_model, field.name)
    if name in _RUN_FIELDS:
      continue
    if dataclasses.is_dataclass(ours) and dataclasses.is_dataclass(theirs):
      _check_same_model(ours, theirs, source, f"{prefix}{name}.")
    elif ours != theirs:
      raise ValueError(
          f"Warm start from {source}: its model has {prefix}{name}={theirs!r}, this one "
          f"{ours!r}; pick the preset of that checkpoint, or --set "
          f"train.stage.model.{prefix}{name}={theirs!r}.")


def token_weights(counted: jax.Array, segment_ids: jax.Array, reduction: str) -> jax.Array:
  """(batch, length) float32 loss weights of the `counted` target tokens, 0 elsewhere: 1, or
  1 / n or 1 / sqrt(n) with n the counted tokens of the same row and segment."""
  counted = counted.astype(jnp.float32)
  if reduction == "token":
    return counted
  # Per row, so that the batch axis stays a batch axis (sharded rows need no communication).
  row_counts = lambda c, s: jax.ops.segment_sum(c, s, num_segments=s.shape[0] + 1)[s]
  n = jnp.maximum(jax.vmap(row_counts)(counted, segment_ids), 1.0)
  return counted / (n if reduction == "sample" else jnp.sqrt(n))


@dataclasses.dataclass(frozen=True)
class ChatStage:
  """`template` and `max_tiles` say how the data is rendered (`train.inputs.chat_batches`);
  `train_llm` says whether the optimizer trains the LLM, for the FLOPs count only;
  `loss_block_size` how many vocabulary columns the loss scores at a time
  (`losses.chunked_lm_token_losses`). `pack_length` and `pack_tiles` are the packed rows' shape,
  as data.pack_length and data.pack_tiles make them (None: a conversation per row of max_len)."""

  model: ChatConfig
  max_len: int = 2048  # tokens per conversation, image tokens included
  template: str = "vicuna_v1"
  max_tiles: int = 1  # 1: each image resized to one tile; more: dynamic tiling + thumbnail
  train_llm: bool = True
  loss_block_size: int = 8192  # (tokens, 8192) float32 logits at a time, not (tokens, vocab)
  pack_length: int | None = None
  pack_tiles: int = 40
  # The official flag's default, and what the unpacked 2nd-stage fine-tunes (chat spec 6.2) do;
  # InternVL2.5's packed stage scripts use "square" (with loss_reduction_all_gather).
  loss_reduction: str = "token"

  def __post_init__(self):
    if self.template not in templates.TEMPLATES:
      raise ValueError(f"ChatStage: unknown template {self.template!r}; known: "
                       f"{tuple(templates.TEMPLATES)}.")
    if self.max_tiles < 1:
      raise ValueError(f"ChatStage: max_tiles must be at least 1, got {self.max_tiles}.")
    if self.max_len <= self.model.num_image_tokens * self.tile_slots:
      raise ValueError(f"ChatStage: max_len {self.max_len} cannot hold the image tokens of "
                       f"{self.tile_slots} tile(s) of {self.model.num_image_tokens} plus text.")
    if self.max_len > self.model.llm.max_positions:
      raise ValueError(f"ChatStage: max_len {self.max_len} is beyond the LLM's "
                       f"{self.model.llm.max_positions} positions.")
    if self.loss_reduction not in LOSS_REDUCTIONS:
      raise ValueError(f"ChatStage: loss_reduction={self.loss_reduction!r} is not one of "
                       f"{LOSS_REDUCTIONS}.")
    if self.pack_length is not None and self.pack_length < self.max_len:
      raise ValueError(f"ChatStage: pack_length {self.pack_length} is shorter than a "
                       f"conversation's max_len {self.max_len}.")
    if self.pack_length is not None and self.pack_tiles < self.tile_slots:
      raise ValueError(f"ChatStage: pack_tiles {self.pack_tiles} cannot hold one image's "
                       f"{self.tile_slots} tiles.")

  @property
  def row_shape(self) -> tuple[int, int]:
    """(tokens, tile slots) of a batch row: a packed row's, or one conversation's."""
    if self.pack_length is None:
      return self.max_len, self.tile_slots
    return self.pack_length, self.pack_tiles

  @property
  def tile_slots(self) -> int:
    """Tiles per example in a batch: the dynamic tiles and the thumbnail, or one."""
    return 1 if self.max_tiles == 1 else self.max_tiles + 1

  @property
  def appended_tokens(self) -> int:
    """Tokens the chat tokenizer appends to the LLM's own vocabulary (images, template)."""
    return len(IMAGE_TOKENS) + len(templates.TEMPLATES[self.template].special_tokens)

  @property
  def _module(self) -> InternVLChat:
    return InternVLChat(self.model)

  def init(self, rng):
    model = self.model
    size, channels = model.image_size, model.vision.num_channels
    tokens = jnp.full((1, model.num_image_tokens), model.image_context_id, jnp.int32)
    with lora.adapters(model.lora):
      return self._module.init(rng, jnp.zeros((1, 1, size, size, channels)),
                               jnp.ones((1,), jnp.int32), tokens)["params"]

  def encode(self, params, batch, rng, train: bool = True):
    # The LoRA adapters' dropout is the only randomness: InternVL-Chat has no dropout, and its
    # ViT runs without drop path.
    mask = batch["token_mask"] if self.pack_length is None else batch["segment_ids"]
    with lora.adapters(self.model.lora, train):
      out = self._module.apply({"params": params}, batch["tiles"], batch["tile_count"],
                               batch["tokens"], mask, return_logits=False,
                               method=InternVLChat.llm_output,
                               rngs=None if rng is None else {"dropout": rng})
    nll, counted = losses.chunked_lm_token_losses(
        out.hidden_state, llama.head_kernel(self.model.llm, params["language_model"]),
        batch["labels"], block_size=self.loss_block_size, ignore_index=IGNORE_LABEL,
        valid=batch["valid"])
    # Each target weighs by its own conversation (the data never counts a conversation's first
    # label, the one target whose position belongs to the conversation before).
    weights = token_weights(counted, mask[:, 1:].astype(jnp.int32), self.loss_reduction)
    return {"nll": jnp.sum(nll, axis=1), "tokens": jnp.sum(counted, axis=1).astype(jnp.float32),
            "weighted_nll": jnp.sum(weights * nll, axis=1), "weight": jnp.sum(weights, axis=1)}

  def loss(self, params, features, batch):
    del params, batch
    tokens = jnp.sum(features["tokens"])
    loss = jnp.sum(features["weighted_nll"]) / jnp.maximum(jnp.sum(features["weight"]), 1e-12)
    metrics = {"answer_tokens": tokens}
    if self.loss_reduction != "token":
      metrics["token_loss"] = jnp.sum(features["nll"]) / jnp.maximum(tokens, 1.0)
    return loss, metrics

  def abstract_batch(self, batch_size: int):
    size, channels = self.model.image_size, self.model.vision.num_channels
    length, slots = self.row_shape
    text = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    if self.pack_length is None:
      mask = {"token_mask": jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)}
    else:
      mask = {"segment_ids": text}
    return {"tiles": jax.ShapeDtypeStruct((batch_size, slots, size, size, channels), jnp.float32),
            "tile_count": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "tokens": text, "labels": text, **mask,
            "valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

  def flops_per_example(self) -> int:
    """Of a batch row; a packed row's attention is counted over the whole row."""
    return flops.chat_training_flops(self.model, *self.row_shape, self.train_llm)

  def count_tokens(self, batch) -> int:
    if self.pack_length is None:
      return int(np.sum(np.asarray(batch["token_mask"])))
    return int(np.sum(np.asarray(batch["segment_ids"]) > 0))

  def warm_start(self, params, source_config, source_params, source):
    """From InternVL (stage 1 or 2: the vision tower; for the "qllama" variant also stage 2's
    QLLaMA), InternViT (the vision tower), LLaMA (the LLM, e.g. Vicuna) or InternVL-Chat (every
    param it has, e.g. step 2 from step 1, or a released checkpoint to fine-tune: the same model
    but for how it runs; LoRA adapters stay fresh)."""
    warm_start.require(source_config, (InternVLConfig, VisionConfig, LlamaConfig, ChatConfig),
                       source, "InternVL-Chat")
    if isinstance(source_config, VisionConfig):
      return warm_start.graft(params, {"vision_model": source_params}, source)
    if isinstance(source_config, LlamaConfig):
      return warm_start.graft(
          params, {"language_model": self._llm_params(params["language_model"], source_params,
                                                      source)}, source)
    if isinstance(source_config, ChatConfig):
      _check_same_model(self.model, source_config, source)
      parts = {name: lora.with_base(source_params[name], params[name])
               for name in params if name in source_params}
      return warm_start.graft(params, parts, source)
    parts = {"vision_model": source_params["vision_model"]}
    if "qllama" in params and source_config.variant == "G":
      # InternVL-G's QLLaMA also has the token embeddings and LM head the chat one lacks.
      parts["qllama"] = {name: source_params["qllama"][name] for name in params["qllama"]}
    return warm_start.graft(params, parts, source)

  def _llm_params(self, fresh: dict, given: dict, source: str) -> dict:
    """A LLaMA checkpoint's params as the LLM's: its vocabulary is the first rows of the
    embeddings and LM head; the rows of the tokens the chat tokenizer appends stay fresh."""
    vocab = self.model.llm.vocab_size
    source_vocab = np.shape(given["embed_tokens"]["embedding"])[0]
    if not 0 <= vocab - source_vocab <= self.appended_tokens:
      raise ValueError(
          f"Warm start from {source}: its LLaMA has a {source_vocab}-token vocabulary; this "
          f"model's LLM has {vocab}, which should be it plus the {self.appended_tokens} tokens "
          f"the {self.template} chat tokenizer appends: the models differ in size.")
    out = {name: given[name] for name in fresh if name in given}
    for name, key, axis in (("embed_tokens", "embedding", 0), ("lm_head", "kernel", 1)):
      if name not in out or source_vocab == vocab:
        continue
      table = np.array(fresh[name][key])
      rows = tuple(slice(0, source_vocab) if i == axis else slice(None) for i in range(table.ndim))
      if table[rows].shape == np.shape(given[name][key]):  # else `graft` names the mismatch
        table[rows] = given[name][key]
        out[name] = {key: table}
    return out
