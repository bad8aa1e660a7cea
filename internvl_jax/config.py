"""Model configs: frozen dataclasses with named presets.

Numbers come from the InternVL paper and the released config.json files (see the spec); the
`tiny` presets exist for tests and the CPU demo.
"""

import dataclasses

import jax.numpy as jnp

from internvl_jax.data import templates
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.models import remat

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORM_TYPES = ("rms_norm", "layer_norm")
DROP_PATH_SCHEDULES = ("linear", "uniform")
INTERNVL_VARIANTS = ("C", "G")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def _check_choice(field: str, value, choices):
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {choices}.")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which kernel computes a tower's attention (`models/attention.py`); results agree to float
  rounding on every real query.

  "xla"     the einsum reference, with a (batch, 1, queries, keys) boolean mask;
  "cudnn"   cuDNN flash attention (NVIDIA GPUs; bfloat16 or float16);
  "splash"  Pallas splash attention (TPUs; Pallas interpret mode elsewhere, for tests);
  "auto"    splash on TPU, cuDNN on GPU for half-precision inputs, else XLA: the platform is the
            mesh's in `jax.set_mesh`, else JAX's default backend.
  The block sizes are splash's tiles (its backward kernels use the same), shrunk to the padded
  sequence when shorter: `block_q` and `block_kv_compute` are multiples of 128, and `block_kv`
  is a multiple of `block_kv_compute`.
  """

  implementation: str = "auto"
  block_q: int = 512
  block_kv: int = 512
  block_kv_compute: int = 512

  def __post_init__(self):
    _check_choice("attention.implementation", self.implementation, ATTENTION_IMPLEMENTATIONS)
    if (any(b < 128 or b % 128 for b in (self.block_q, self.block_kv_compute))
        or self.block_kv % self.block_kv_compute):
      raise ValueError(f"AttentionConfig: block_q {self.block_q} and block_kv_compute "
                       f"{self.block_kv_compute} must be positive multiples of 128, and block_kv "
                       f"{self.block_kv} a multiple of block_kv_compute.")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """InternViT hyper-parameters (spec section 1.1)."""

  hidden_size: int = 3200
  num_layers: int = 48
  num_heads: int = 25
  mlp_dim: int = 12800
  image_size: int = 224  # the resolution the position embedding is stored for
  patch_size: int = 14
  num_channels: int = 3
  norm_type: str = "rms_norm"
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  qk_norm: bool = True
  layerscale_init: float = 0.1
  # Stochastic depth. "linear" ramps 0 -> rate over depth as the released code does; "uniform"
  # uses the rate in every block, as the paper's stage 1 says ("uniform 0.2").
  drop_path_rate: float = 0.0
  drop_path_schedule: str = "linear"
  dtype: str = "float32"  # compute dtype; params are float32
  remat_policy: str = "none"  # one of models/remat.py's POLICIES
  # False: the blocks run one after another on slices of the same stacked params, as MaxText's
  # `scan_layers=False`; compile time grows with depth, but no step copies layers into and out of
  # the loop's stacked buffers.
  scan_layers: bool = True
  attention: AttentionConfig = AttentionConfig()

  def __post_init__(self):
    _check_choice("norm_type", self.norm_type, NORM_TYPES)
    _check_choice("drop_path_schedule", self.drop_path_schedule, DROP_PATH_SCHEDULES)
    remat.check_policy(self.remat_policy)
    _check_choice("dtype", self.dtype, tuple(DTYPES))
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"VisionConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
          f"{self.num_heads}.")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"VisionConfig: image_size {self.image_size} is not a multiple of patch_size "
          f"{self.patch_size}.")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"VisionConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid_size**2 + 1

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes) -> "VisionConfig":
    return dataclasses.replace(self, **changes)


_INTERN_VIT_6B = VisionConfig()

VISION_PRESETS = {
    "tiny": VisionConfig(
        hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256, image_size=32, patch_size=8),
    "300m-448": VisionConfig(
        hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, image_size=448,
        norm_type="layer_norm", qkv_bias=True, qk_norm=False, layerscale_init=1.0),
    "6b-224": _INTERN_VIT_6B,
    "6b-448-v1.0": _INTERN_VIT_6B.replace(image_size=448),
    # V1-2 / V1-5 keep the first 45 blocks: the 4th-to-last output of the 48-block model.
    "6b-448-v1.5": _INTERN_VIT_6B.replace(image_size=448, num_layers=45),
}


def vision_preset(name: str, **overrides) -> VisionConfig:
  """Returns the named InternViT preset, with field overrides."""
  if name not in VISION_PRESETS:
    raise ValueError(f"Unknown vision preset {name!r}; known presets: {sorted(VISION_PRESETS)}.")
  return VISION_PRESETS[name].replace(**overrides)


ROPE_SCALING_KINDS = ("linear", "dynamic", "longrope")
ROPE_LENGTHS = ("positions", "keys")
# The LLM classes of InternVL-Chat's official code, as config.json's `architectures` names them
# (chat spec 3.3): the same decoder under each family's parameter names and config.json.
LLM_ARCHITECTURES = ("LlamaForCausalLM", "InternLM2ForCausalLM", "Qwen2ForCausalLM",
                     "Phi3ForCausalLM")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How rotary positions stretch past the pretraining length (chat spec 2.1-2.3).

  "linear"   positions are divided by `factor` (InternLM2, transformers).
  "dynamic"  NTK-aware: for a sequence of L > `original_max_positions` tokens the base becomes
             base * (factor * L / original_max_positions - (factor - 1))**(d / (d - 2)), d the
             head dim (InternLM2.5, InternVL3's Qwen2.5, transformers).
  "longrope" Phi-3's "su": frequency i is divided by `short_factor[i]` while L <=
             `original_max_positions`, else by `long_factor[i]`, and cos and sin are scaled by
             sqrt(1 + ln(factor) / ln(original_max_positions)) (1 when factor <= 1), `factor`
             being the context extension max_position_embeddings / original_max_positions.
  `length` says what L is: "positions" is the largest position in the batch plus one
  (transformers' dynamic and longrope, Phi-3's su); "keys" the number of key slots including the
  cache and any padding (InternLM2's dynamic NTK, which passes its kv_seq_len). Keys already in a
  KV cache keep the rotation they were written with, as both references' caches do. Both
  references' dynamic NTK also keeps state between calls (InternLM2's never shrinks back,
  transformers' resets below the original length); here each call computes from its own length,
  which is the same over one growing sequence: a prompt, then its decoding steps.
  """

  kind: str
  factor: float = 1.0
  original_max_positions: int = 0  # dynamic: max_position_embeddings; longrope: the original one
  length: str = "positions"
  short_factor: tuple[float, ...] = ()  # longrope: one divisor per frequency (head_dim / 2)
  long_factor: tuple[float, ...] = ()

  def __post_init__(self):
    _check_choice("rope_scaling.kind", self.kind, ROPE_SCALING_KINDS)
    _check_choice("rope_scaling.length", self.length, ROPE_LENGTHS)
    # Lists from config.json become tuples, so that the config stays hashable (a static jit arg).
    for field in ("short_factor", "long_factor"):
      object.__setattr__(self, field, tuple(float(f) for f in getattr(self, field)))
    longrope = self.kind == "longrope"
    if not (self.factor > 0 if longrope else self.factor >= 1):
      raise ValueError(f"RopeScaling: {self.kind} factor {self.factor} must be "
                       f"{'> 0' if longrope else '>= 1'}.")
    if self.kind != "linear" and self.original_max_positions < 1:
      raise ValueError(f"RopeScaling: {self.kind} scaling needs original_max_positions (the length "
                       "it scales beyond).")
    if longrope != bool(self.short_factor and self.long_factor):
      raise ValueError(f"RopeScaling: short_factor and long_factor are "
                       f"{'needed' if longrope else 'only'} for longrope scaling.")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA-family decoder hyper-parameters (spec section 2.1), named after their config.json fields.

  One decoder serves LLaMA / Yi / LLaMA-3, InternLM2 / 2.5, Qwen2 / 2.5 and Phi-3 (chat spec 2):
  the families differ only in the fields (q/k/v biases, RoPE base and scaling, tied head, sizes).
  `architecture` names the family, which the computation ignores: it picks the parameter names
  and config.json that an InternVL-Chat checkpoint holds the LLM under.
  """

  vocab_size: int = 49954
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32  # < num_heads: grouped-query attention
  mlp_dim: int = 11008
  norm_eps: float = 1e-6
  max_positions: int = 2048
  rope_base: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2), none on o
  tie_embeddings: bool = False
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 0
  dtype: str = "float32"  # compute dtype; params are float32
  remat_policy: str = "none"  # one of models/remat.py's POLICIES
  architecture: str = "LlamaForCausalLM"  # one of LLM_ARCHITECTURES
  attention: AttentionConfig = AttentionConfig()  # QLLaMA's self- and cross-attention too

  def __post_init__(self):
    remat.check_policy(self.remat_policy)
    _check_choice("architecture", self.architecture, LLM_ARCHITECTURES)
    _check_choice("dtype", self.dtype, tuple(DTYPES))
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"LlamaConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
          f"{self.num_kv_heads} (each key/value head serves a whole group of query heads).")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for rotary embeddings.")
    scaling = self.rope_scaling
    if scaling is not None and scaling.kind == "longrope":
      for field in ("short_factor", "long_factor"):
        if len(getattr(scaling, field)) != self.head_dim // 2:
          raise ValueError(f"LlamaConfig: rope_scaling.{field} has {len(getattr(scaling, field))} "
                           f"factors; head_dim {self.head_dim} has {self.head_dim // 2} frequencies.")
    for field in ("bos_id", "eos_id", "pad_id"):
      if not 0 <= getattr(self, field) < self.vocab_size:
        raise ValueError(f"LlamaConfig: {field}={getattr(self, field)} is outside the vocabulary "
                         f"of {self.vocab_size} tokens.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


# The multilingual LLaMA-7B that InternVL's text encoder and QLLaMA start from (Chinese-Alpaca).
_LLAMA_7B = LlamaConfig()

# The LLMs of the released InternVL-Chat 1.5-3 checkpoints are held as InternVL holds them (chat
# spec 1.3): the vocabulary is the base tokenizer's plus the tokens the fine-tune scripts append,
# in this order, resizing the embeddings to fit; and the head is untied, because
# InternVLChatConfig forces tie_word_embeddings False (spec 2.6) even where the base LLM ties it
# (Qwen2.5 up to 3B). Instruct and base models of one size share a preset.
INTERNVL_ADDED_TOKENS = tokenizer_lib.IMAGE_TOKENS + ("<quad>", "</quad>", "<ref>", "</ref>",
                                                     "<box>", "</box>")


def _internvl_vocab(tokenizer_size: int) -> int:
  return tokenizer_size + len(INTERNVL_ADDED_TOKENS)


def _internlm2_rope(factor: float) -> RopeScaling:
  # InternLM2's own dynamic NTK keys on the kv length (chat spec 2.1).
  return RopeScaling("dynamic", factor, original_max_positions=32768, length="keys")


# InternLM2 / 2.5: <s> 1 and </s> 2 as in LlamaConfig's defaults.
_INTERNLM2 = LlamaConfig(vocab_size=_internvl_vocab(92544), num_kv_heads=8, norm_eps=1e-5,
                         max_positions=32768, rope_base=1e6, rope_scaling=_internlm2_rope(2.0),
                         architecture="InternLM2ForCausalLM")
_INTERNLM2_1_8B = _INTERNLM2.replace(hidden_size=2048, num_layers=24, num_heads=16, mlp_dim=8192)
_INTERNLM2_20B = _INTERNLM2.replace(hidden_size=6144, num_layers=48, num_heads=48, mlp_dim=16384)
# Qwen2.5's tokenizer holds 151665 tokens, fewer than the 151936 / 152064 rows the base models
# ship. <|endoftext|> begins and pads, as in Qwen's configs; eos is <|im_end|>, which chat stops on
# and which the official -hf converter writes for InternVL3, whose base-model llm_config says
# <|endoftext|> (chat spec 1.3, 4.3).
_QWEN2_5 = LlamaConfig(vocab_size=_internvl_vocab(151665), norm_eps=1e-6, max_positions=32768,
                       rope_base=1e6, qkv_bias=True, bos_id=151643, eos_id=151645, pad_id=151643,
                       architecture="Qwen2ForCausalLM")

LLAMA_PRESETS = {
    "tiny": LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                        mlp_dim=160, max_positions=128),
    "llama-7b": _LLAMA_7B,
    # TinyLlama-1.1B's shape (grouped-query attention): the text tower of single-GPU presets.
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                                  num_kv_heads=4, mlp_dim=5632, max_positions=2048, norm_eps=1e-5),
    "vicuna-7b": _LLAMA_7B.replace(vocab_size=32000),
    "vicuna-13b": _LLAMA_7B.replace(vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40,
                                    num_kv_heads=40, mlp_dim=13824),
    "internlm2-chat-1.8b": _INTERNLM2_1_8B,
    "internlm2-chat-20b": _INTERNLM2_20B.replace(rope_scaling=_internlm2_rope(3.0)),
    # Unverified beyond the shapes (chat spec 7.8): theta, scaling and eps are internlm2-chat-1.8b's.
    "internlm2.5-1.8b-chat": _INTERNLM2_1_8B,
    "internlm2.5-7b-chat": _INTERNLM2.replace(hidden_size=4096, num_layers=32, num_heads=32,
                                               mlp_dim=14336),
    "internlm2.5-20b-chat": _INTERNLM2_20B.replace(rope_base=5e7,
                                                   rope_scaling=_internlm2_rope(2.5)),
    # InternVL's tokens take ids 32011-32019, shrinking the 32064-row table. The LongRoPE ("su")
    # divisors, 48 per list, exist in two revisions, and which one the checkpoints carry is
    # unverified (chat spec 2.2): rope_scaling comes from the checkpoint's llm_config on
    # conversion, so this preset holds the shapes with plain RoPE.
    "phi-3-mini-128k": LlamaConfig(
        vocab_size=_internvl_vocab(32011), hidden_size=3072, num_layers=32, num_heads=32,
        num_kv_heads=32, mlp_dim=8192, norm_eps=1e-5, max_positions=131072, eos_id=32000,
        architecture="Phi3ForCausalLM"),
    "qwen2.5-0.5b": _QWEN2_5.replace(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                     mlp_dim=4864),
    # Unverified (chat spec 7.7): Qwen2.5-1.5B's published shapes, not checked against a config.
    "qwen2.5-1.5b": _QWEN2_5.replace(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                                     mlp_dim=8960),
    "qwen2.5-3b": _QWEN2_5.replace(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
                                   mlp_dim=11008),
    "qwen2.5-7b": _QWEN2_5.replace(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                                   mlp_dim=18944),
    "qwen2.5-32b": _QWEN2_5.replace(hidden_size=5120, num_layers=64, num_heads=40, num_kv_heads=8,
                                    mlp_dim=27648),
    # LLaMA-family LLMs of InternVL2-40B / -Llama3-76B, with their base vocabularies.
    "yi-34b": LlamaConfig(vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56,
                          num_kv_heads=8, mlp_dim=20480, norm_eps=1e-5, max_positions=4096,
                          rope_base=5e6),
    "llama3-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
                              num_kv_heads=8, mlp_dim=28672, norm_eps=1e-5, max_positions=8192,
                              rope_base=5e5, bos_id=128000, eos_id=128003, pad_id=0),
}


def llama_preset(name: str, **overrides) -> LlamaConfig:
  """Returns the named LLaMA preset, with field overrides."""
  if name not in LLAMA_PRESETS:
    raise ValueError(f"Unknown LLaMA preset {name!r}; known presets: {sorted(LLAMA_PRESETS)}.")
  return LLAMA_PRESETS[name].replace(**overrides)


@dataclasses.dataclass(frozen=True)
class QLlamaConfig:
  """QLLaMA (spec 2.2): LLaMA plus learnable queries that cross-attend to vision tokens.

  Layer i has a cross-attention block iff i % cross_attention_frequency == 0. The official code
  hard-codes a vision width of 3200 and 96 queries; here both come from the config.
  """

  text: LlamaConfig = _LLAMA_7B
  vision_width: int = 3200
  num_queries: int = 96
  cross_attention_frequency: int = 2

  def __post_init__(self):
    if self.num_queries < 1 or self.vision_width < 1:
      raise ValueError(f"QLlamaConfig: num_queries {self.num_queries} and vision_width "
                       f"{self.vision_width} must be positive.")
    frequency = self.cross_attention_frequency
    if frequency < 1 or self.text.num_layers % frequency:
      raise ValueError(
          f"QLlamaConfig: cross_attention_frequency {frequency} must be positive and divide "
          f"num_layers {self.text.num_layers} (the layers are scanned in blocks of {frequency}, "
          "the first of each with cross-attention).")

  @property
  def num_blocks(self) -> int:
    return self.text.num_layers // self.cross_attention_frequency

  def replace(self, **changes) -> "QLlamaConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  """InternVL-C / -G (spec 3): InternViT, the LLaMA text tower / QLLaMA base, and the heads.

  `variant` says which params the model has: "C" (stage 1: the LLaMA text tower `text_model`)
  or "G" (stage 2: QLLaMA, whose LLaMA weights are that text tower; the released InternVL-14B,
  which embeds as InternVL-C too). InternVL-C ignores the two QLLaMA fields. QLLaMA's own config
  is derived (`qllama`), so the vision width it cross-attends to cannot disagree with the vision
  tower.
  """

  vision: VisionConfig = _INTERN_VIT_6B
  text: LlamaConfig = _LLAMA_7B
  embed_dim: int = 768  # the contrastive embedding width
  attn_pool_heads: int = 16
  attn_pool_eps: float = 1e-5  # the pooling's LayerNorms use PyTorch's default, not 1e-6
  logit_scale_init: float = 2.659260036932778  # log(1 / 0.07)
  num_queries: int = 96  # QLLaMA's learnable queries (InternVL-G)
  cross_attention_frequency: int = 2  # QLLaMA layers 0, f, 2f, ... cross-attend to the image
  variant: str = "G"  # one of INTERNVL_VARIANTS

  def __post_init__(self):
    _check_choice("variant", self.variant, INTERNVL_VARIANTS)
    for width, name in ((self.vision.hidden_size, "vision"), (self.text.hidden_size, "text")):
      if width % self.attn_pool_heads:
        raise ValueError(f"InternVLConfig: the {name} width {width} is not divisible by "
                         f"attn_pool_heads {self.attn_pool_heads}.")
    _ = self.qllama  # building QLLaMA's config checks its fields

  @property
  def qllama(self) -> QLlamaConfig:
    return QLlamaConfig(self.text, self.vision.hidden_size, self.num_queries,
                        self.cross_attention_frequency)

  def require_variant(self, variant: str, user: str):
    """Refuses a model of the other variant for `user` (a stage), saying what to change."""
    if self.variant != variant:
      raise ValueError(f"{user} trains InternVL-{variant}; this model's variant is "
                       f"{self.variant!r}: build it with variant={variant!r}.")

  def replace(self, **changes) -> "InternVLConfig":
    return dataclasses.replace(self, **changes)


INTERNVL_PRESETS = {
    "tiny": InternVLConfig(vision=VISION_PRESETS["tiny"], text=LLAMA_PRESETS["tiny"], embed_dim=32,
                           attn_pool_heads=4, num_queries=4),
    # The demo runs' model (experiments/*, on the demo data at 64 px with its 512-piece tokenizer).
    # LayerScale starts at 1.0, as in InternViT-300M. The embedding is 64 wide so that it holds the
    # background the captions name as well as colour and shape; 32 wide lost held-out shapes.
    "demo": InternVLConfig(vision=VISION_PRESETS["tiny"].replace(image_size=64,
                                                                  layerscale_init=1.0),
                           text=LLAMA_PRESETS["tiny"].replace(vocab_size=512), embed_dim=64,
                           attn_pool_heads=4, num_queries=4),
    # InternVL-14B-224px (InternVL-C and -G): InternViT-6B-224px + QLLaMA on the multilingual
    # LLaMA-7B, 96 queries, cross-attention in every second layer.
    "14b-224": InternVLConfig(),
}


def internvl_preset(name: str, **overrides) -> InternVLConfig:
  """Returns the named InternVL preset, with field overrides."""
  if name not in INTERNVL_PRESETS:
    raise ValueError(f"Unknown InternVL preset {name!r}; known presets: {sorted(INTERNVL_PRESETS)}.")
  return INTERNVL_PRESETS[name].replace(**overrides)


CHAT_VARIANTS = ("v1.0", "qllama", "v1.5")
PS_VERSIONS = ("v1", "v2")


def _chat_llm(preset: str) -> LlamaConfig:
  """A LLaMA preset whose vocabulary holds the image tokens the chat tokenizer appends
  (<img>, </img>, <IMG_CONTEXT>, in this order: `data/tokenizer.py`)."""
  llm = LLAMA_PRESETS[preset]
  return llm.replace(vocab_size=llm.vocab_size + len(tokenizer_lib.IMAGE_TOKENS))


def _image_context_id(llm: LlamaConfig) -> int:
  return llm.vocab_size - 1  # <IMG_CONTEXT> is the last of the appended image tokens


def _added_token_id(llm: LlamaConfig, token: str) -> int:
  """The id of one of InternVL's added tokens, which end the released LLMs' vocabularies."""
  return llm.vocab_size - len(INTERNVL_ADDED_TOKENS) + INTERNVL_ADDED_TOKENS.index(token)


_DEFAULT_CHAT_LLM = _chat_llm("vicuna-13b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters of a chat model in fine-tuning (chat spec 6.1: `use_backbone_lora` and
  `use_llm_lora`; `models/lora.py`). A rank of 0 leaves that tower without adapters.

  The official code fixes alpha = 2 r, so the adapters' scale alpha / r is `alpha_per_rank`.
  """

  vision_rank: int = 0  # the ViT's attn qkv / proj and mlp fc1 / fc2
  llm_rank: int = 0  # the LLM's q/k/v/o and gate/up/down projections (InternLM2's wqkv/wo/w1-3)
  alpha_per_rank: float = 2.0
  dropout: float = 0.05  # on the adapters' inputs, in training

  def __post_init__(self):
    if min(self.vision_rank, self.llm_rank) < 0 or not (self.vision_rank or self.llm_rank):
      raise ValueError(f"LoraConfig: ranks must be >= 0 and one positive, got vision_rank "
                       f"{self.vision_rank}, llm_rank {self.llm_rank}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout}.")


@dataclasses.dataclass(frozen=True)
class ChatConfig:
  """InternVL-Chat (spec 4.4): InternViT -> projector -> a LLaMA-family LLM.

  `variant` picks the vision side and projector:
    "v1.0"   the LLaVA-1.5 recipe: layer `select_layer` of InternViT, patch tokens (no CLS),
             `mlp1` = Linear(D, H) -> GELU -> Linear(H, H) (LLaVA's mlp2x_gelu).
    "qllama" InternVL-G's vision side: as "v1.0" for the patches, plus QLLaMA's query outputs
             (image mode, cross-attending to the last ViT block) through `mlp2` =
             Linear(W, H) -> GELU -> Linear(H, H); tokens are [queries; patches] (two_mlp).
    "v1.5"   InternVL-Chat 1.1+: layer `select_layer`, patch tokens, pixel shuffle by
             `downsample_ratio` (`ps_version` "v1" leaves the grid transposed, "v2" swaps it
             back), `mlp1` = LayerNorm(D r^-2) -> Linear -> GELU -> Linear.
  Image features overwrite the embeddings of the `image_context_id` tokens in order; the prompt
  holds `num_image_tokens` of them per tile. The defaults are V1-5's vision side on a 13B LLaMA.

  The fields from `template` to `max_dynamic_patch` are what the official chat() reads from config.json (chat families spec 3.3):
  the conversation template (`data/templates.py`) and its system message, and how an image is
  cut into tiles. Their defaults are the official config class's, which a config.json without
  them gets; the released 1.5-3 checkpoints store dynamic tiling with a thumbnail, 1-12 tiles.
  `lora`, as the official config's LoRA ranks, says which adapters the params hold.
  """

  vision: VisionConfig = VISION_PRESETS["6b-448-v1.5"]
  llm: LlamaConfig = _DEFAULT_CHAT_LLM
  variant: str = "v1.5"
  image_size: int = 448  # the tiles' resolution; the ViT resizes its position embedding to it
  select_layer: int = -1  # as the reference's hidden_states[select_layer]; -1 the last block
  downsample_ratio: float = 0.5  # "v1.5" only
  ps_version: str = "v2"  # "v1.5" only
  projector_eps: float = 1e-5  # the "v1.5" LayerNorm's (PyTorch's default)
  image_context_id: int = _image_context_id(_DEFAULT_CHAT_LLM)  # <IMG_CONTEXT>
  qllama: QLlamaConfig | None = None  # "qllama" only: the QLLaMA whose queries join the tokens
  template: str | None = None  # None: not named, so chat() must be given one
  system_message: str | None = None  # None: the template's default
  dynamic_image_size: bool = False  # cut an image into tiles by its aspect ratio, or resize it
  use_thumbnail: bool = False  # add the whole image as one more tile when it has several
  min_dynamic_patch: int = 1
  max_dynamic_patch: int = 6
  # Adapters while fine-tuning; None in released checkpoints (`lora.merge` folds them in).
  lora: LoraConfig | None = None

  def __post_init__(self):
    _check_choice("variant", self.variant, CHAT_VARIANTS)
    _check_choice("ps_version", self.ps_version, PS_VERSIONS)
    if self.template is not None:
      _check_choice("template", self.template, tuple(templates.TEMPLATES))
    if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
      raise ValueError(f"ChatConfig: need 1 <= min_dynamic_patch <= max_dynamic_patch, got "
                       f"{self.min_dynamic_patch}, {self.max_dynamic_patch}.")
    num_states = self.vision.num_layers + 1
    if not -num_states <= self.select_layer < num_states:
      raise ValueError(f"ChatConfig: select_layer {self.select_layer} is out of range for the "
                       f"{num_states} hidden states of a {self.vision.num_layers}-block InternViT.")
    if self.image_size % self.vision.patch_size:
      raise ValueError(f"ChatConfig: image_size {self.image_size} is not a multiple of the patch "
                       f"size {self.vision.patch_size}.")
    if not 0 <= self.image_context_id < self.llm.vocab_size:
      raise ValueError(f"ChatConfig: image_context_id {self.image_context_id} is outside the LLM's "
                       f"vocabulary of {self.llm.vocab_size} tokens.")
    if (self.qllama is None) != (self.variant != "qllama"):
      raise ValueError(f"ChatConfig: variant {self.variant!r} "
                       f"{'needs' if self.qllama is None else 'takes no'} a qllama config.")
    if self.qllama is not None and self.qllama.vision_width != self.vision.hidden_size:
      raise ValueError(f"ChatConfig: QLLaMA cross-attends to width {self.qllama.vision_width}, the "
                       f"vision tower has {self.vision.hidden_size}.")
    if self.variant == "v1.5":
      factor = round(1 / self.downsample_ratio)
      if factor < 1 or abs(factor * self.downsample_ratio - 1) > 1e-9:
        raise ValueError(f"ChatConfig: downsample_ratio {self.downsample_ratio} is not 1 / k for a "
                         "whole k.")
      if self.grid_size % factor:
        raise ValueError(f"ChatConfig: the {self.grid_size}x{self.grid_size} patch grid does not "
                         f"split into {factor}x{factor} blocks for downsample_ratio "
                         f"{self.downsample_ratio}.")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.vision.patch_size

  @property
  def shuffle_factor(self) -> int:
    """How many patches per side one pixel-shuffled token merges (2 for downsample_ratio 0.5)."""
    return round(1 / self.downsample_ratio)

  @property
  def num_image_tokens(self) -> int:
    """Image tokens per tile: the prompt's <IMG_CONTEXT> tokens per tile."""
    if self.variant == "v1.5":
      return (self.grid_size // self.shuffle_factor)**2
    queries = self.qllama.num_queries if self.variant == "qllama" else 0
    return queries + self.grid_size**2

  def replace(self, **changes) -> "ChatConfig":
    return dataclasses.replace(self, **changes)


def _paper_chat(variant: str, llm_preset: str) -> ChatConfig:
  """Paper Table 9: InternViT-6B-224px run at 336 px (576 patch tokens, layer -4, the LLaVA-1.5
  recipe) + Vicuna v1.5, with or without InternVL-14B's QLLaMA (LLaMA-7B, 96 queries)."""
  llm = _chat_llm(llm_preset)
  return ChatConfig(vision=_INTERN_VIT_6B, llm=llm, variant=variant, image_size=336,
                    select_layer=-4, image_context_id=_image_context_id(llm),
                    qllama=QLlamaConfig() if variant == "qllama" else None, template="vicuna_v1")


def _released_chat(vision: str, llm: LlamaConfig, template: str) -> ChatConfig:
  """A released 1.5-3 checkpoint (chat spec 1.1, 1.4): the last ViT block's 448-px tiles, pixel
  shuffle v2 to 256 tokens, up to 12 tiles plus a thumbnail. V1-5 and Mini-V1-5's ps_version is
  unverified; v2 is what their official 2nd-finetune scripts pass."""
  return ChatConfig(
      vision=VISION_PRESETS[vision], llm=llm, variant="v1.5", image_size=448, select_layer=-1,
      downsample_ratio=0.5, ps_version="v2", template=template, dynamic_image_size=True,
      use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
      image_context_id=_added_token_id(llm, tokenizer_lib.IMAGE_CONTEXT))


# InternVL3's llm_config adds transformers' dynamic NTK to the Qwen2.5 base config; seen for
# InternVL3-1B only (chat spec 2.3), taken for every size. InternVL2.5's is unverified (spec 7.7):
# its Qwen2.5-Instruct presets keep the base configs' none.
_INTERNVL3_ROPE = RopeScaling("dynamic", 2.0, original_max_positions=32768)


def _internvl3_llm(preset: str) -> LlamaConfig:
  return LLAMA_PRESETS[preset].replace(rope_scaling=_INTERNVL3_ROPE)


# Checkpoint: (vision tower, LLM, template) (chat spec 1.1). The V2_5 ViTs are the V1-5 / 300M
# ones trained further, with the same shapes (spec 1.2).
_RELEASED_CHATS = {
    "InternVL-Chat-V1-5": ("6b-448-v1.5", LLAMA_PRESETS["internlm2-chat-20b"], "internlm2-chat"),
    "Mini-InternVL-Chat-2B-V1-5": ("300m-448", LLAMA_PRESETS["internlm2-chat-1.8b"],
                                   "internlm2-chat"),
    "Mini-InternVL-Chat-4B-V1-5": ("300m-448", LLAMA_PRESETS["phi-3-mini-128k"], "phi3-chat"),
    "InternVL2-2B": ("300m-448", LLAMA_PRESETS["internlm2-chat-1.8b"], "internlm2-chat"),
    "InternVL2-4B": ("300m-448", LLAMA_PRESETS["phi-3-mini-128k"], "phi3-chat"),
    "InternVL2-8B": ("300m-448", LLAMA_PRESETS["internlm2.5-7b-chat"], "internlm2-chat"),
    "InternVL2-26B": ("6b-448-v1.5", LLAMA_PRESETS["internlm2-chat-20b"], "internlm2-chat"),
    "InternVL2_5-1B": ("300m-448", LLAMA_PRESETS["qwen2.5-0.5b"], "internvl2_5"),
    "InternVL2_5-2B": ("300m-448", LLAMA_PRESETS["internlm2.5-1.8b-chat"], "internvl2_5"),
    "InternVL2_5-4B": ("300m-448", LLAMA_PRESETS["qwen2.5-3b"], "internvl2_5"),
    "InternVL2_5-8B": ("300m-448", LLAMA_PRESETS["internlm2.5-7b-chat"], "internvl2_5"),
    "InternVL2_5-26B": ("6b-448-v1.5", LLAMA_PRESETS["internlm2.5-20b-chat"], "internvl2_5"),
    "InternVL2_5-38B": ("6b-448-v1.5", LLAMA_PRESETS["qwen2.5-32b"], "internvl2_5"),
    "InternVL3-1B": ("300m-448", _internvl3_llm("qwen2.5-0.5b"), "internvl2_5"),
    "InternVL3-2B": ("300m-448", _internvl3_llm("qwen2.5-1.5b"), "internvl2_5"),
    "InternVL3-8B": ("300m-448", _internvl3_llm("qwen2.5-7b"), "internvl2_5"),
    "InternVL3-38B": ("6b-448-v1.5", _internvl3_llm("qwen2.5-32b"), "internvl2_5"),
}

_TINY_VISION = VISION_PRESETS["tiny"]
_TINY_LLM = LLAMA_PRESETS["tiny"]
_TINY_CHAT = dict(vision=_TINY_VISION, llm=_TINY_LLM, image_context_id=_image_context_id(_TINY_LLM))

CHAT_PRESETS = {
    # Tiny models for tests and the demo: the 32-px ViT run at 48 px (as 224 at 336), or at 32 px
    # with its 4x4 grid shuffled to 2x2.
    "tiny-v1.0": ChatConfig(**_TINY_CHAT, variant="v1.0", image_size=48, select_layer=-2),
    "tiny-qllama": ChatConfig(
        **_TINY_CHAT, variant="qllama", image_size=48, select_layer=-2,
        # A QLLaMA narrower than the LLM, so that mlp2 maps between widths.
        qllama=QLlamaConfig(_TINY_LLM.replace(hidden_size=48, mlp_dim=96),
                            vision_width=_TINY_VISION.hidden_size, num_queries=4)),
    "tiny-v1.5": ChatConfig(**_TINY_CHAT, variant="v1.5", image_size=32),
    "v1.0-vicuna-7b": _paper_chat("v1.0", "vicuna-7b"),
    "v1.0-vicuna-13b": _paper_chat("v1.0", "vicuna-13b"),
    "qllama-vicuna-7b": _paper_chat("qllama", "vicuna-7b"),
    "qllama-vicuna-13b": _paper_chat("qllama", "vicuna-13b"),
    # InternVL-Chat-V1-1: InternViT-6B-448px-V1-0 (48 blocks, the 4th-to-last used) + a
    # LLaMA2-13B-shaped LLM, pixel shuffle v1 (spec 1.3, 4.4c).
    "v1.1-llama2-13b": ChatConfig(
        vision=VISION_PRESETS["6b-448-v1.0"], llm=_chat_llm("vicuna-13b"), select_layer=-4,
        ps_version="v1", image_context_id=_image_context_id(_chat_llm("vicuna-13b")),
        template="vicuna_v1"),
    # The released checkpoints, named as on the hub.
    **{name: _released_chat(*parts) for name, parts in _RELEASED_CHATS.items()},
}


def chat_preset(name: str, **overrides) -> ChatConfig:
  """Returns the named InternVL-Chat preset, with field overrides."""
  if name not in CHAT_PRESETS:
    raise ValueError(f"Unknown chat preset {name!r}; known presets: {sorted(CHAT_PRESETS)}.")
  return CHAT_PRESETS[name].replace(**overrides)
