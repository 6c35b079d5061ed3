"""Typed configs for the three parts of LLaVA-Med (paper §4, Fig. 3) and the presets users start from.

A LLaVA-Med model is a CLIP vision encoder, a projection layer into the word-embedding space and a
LLaMA-style language model. Each part has its own dataclass; `LlavaConfig` ties them together and is what
a checkpoint's `config.json` holds. The presets are the released architectures plus `tiny`, a model small
enough to train through the whole curriculum on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

# LLaVA v1.5's convention: the prompt's <image> placeholder becomes this id in input_ids, and the model
# splices the projected patch features in its place. It is negative so that it can never be a vocab id.
IMAGE_TOKEN_INDEX = -200
# Label value that the loss ignores (PyTorch's cross_entropy default), used for prompts and image patches.
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A config field the model cannot be built with: the message names the field, its value and what it may be."""


def _require(config, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{type(config).__name__}.{name} = {getattr(config, name)!r}: {allowed}")


def _positive_ints(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _require(config, name, isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 "must be a positive integer")


def _positive_number(config, name: str) -> None:
    value = getattr(config, name)
    _require(config, name, isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
             "must be a positive number")


@dataclass
class VisionConfig:
    """CLIP ViT: patch conv + class token + learned positions, pre-norm blocks with quick-GELU."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    channels: int = 3
    norm_eps: float = 1e-5
    # LLaVA takes the hidden state *after* block `select_layer` (Python-style index into the list of
    # layers+1 hidden states, embeddings first); -2 is the penultimate layer.
    select_layer: int = -2
    # "patch" drops the class token, as LLaVA does; "cls_patch" keeps it.
    select_feature: str = "patch"

    def __post_init__(self):
        _positive_ints(self, "image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "channels")
        _positive_number(self, "norm_eps")
        _require(self, "image_size", self.image_size % self.patch_size == 0,
                 f"must be a multiple of patch_size {self.patch_size}")
        _require(self, "width", self.width % self.heads == 0, f"must be a multiple of heads {self.heads}")
        _require(self, "select_layer", isinstance(self.select_layer, int) and not isinstance(self.select_layer, bool)
                 and -(self.layers + 1) <= self.select_layer <= self.layers,
                 f"must index one of the {self.layers + 1} hidden states (embeddings + {self.layers} layers): "
                 f"{-(self.layers + 1)} to {self.layers}")
        _require(self, "select_feature", self.select_feature in ("patch", "cls_patch"), "choose 'patch' or 'cls_patch'")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Decoder positions one image sentinel becomes: its patches, plus the class token under "cls_patch".
        LLaVA-Med v1's <im_start> and <im_end> (mm_use_im_start_end) are ordinary prompt tokens beside it."""
        return self.num_patches + (self.select_feature == "cls_patch")


@dataclass
class ProjectorConfig:
    """The projection layer from vision features to word embeddings: `linear` or `mlp{N}x_gelu`."""

    type: str = "mlp2x_gelu"

    def __post_init__(self):
        _require(self, "type", isinstance(self.type, str) and (self.type == "linear" or (
            (m := re.fullmatch(r"mlp(\d+)x_gelu", self.type)) is not None and int(m.group(1)) >= 1)),
            "choose 'linear' or 'mlp<N>x_gelu' (N >= 1)")

    @property
    def depth(self) -> int:
        """Number of linear layers: `linear` 1, `mlp{N}x_gelu` N."""
        return 1 if self.type == "linear" else int(self.type[3:-6])


@dataclass
class DecoderConfig:
    """LLaMA / Mistral decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

    vocab_size: int = 32000
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    mlp_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def __post_init__(self):
        _positive_ints(self, "vocab_size", "dim", "layers", "heads", "kv_heads", "mlp_dim", "max_seq_len")
        _positive_number(self, "norm_eps")
        _positive_number(self, "rope_theta")
        _require(self, "heads", self.heads % self.kv_heads == 0, f"must be a multiple of kv_heads {self.kv_heads}")
        _require(self, "dim", self.dim % (2 * self.heads) == 0,
                 f"must be a multiple of 2 x heads ({2 * self.heads}): RoPE rotates pairs of each head's dimensions")
        _require(self, "tie_embeddings", isinstance(self.tie_embeddings, bool), "must be true or false")
        for name in ("bos_id", "eos_id", "pad_id"):
            _require(self, name, isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                     "must be an integer token id")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass
class LlavaConfig:
    """The whole model, plus what a checkpoint must carry for prompts and pixels to match training."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Conversation template the model was instruction-tuned with (see conversation.py).
    conv_template: str = "mistral_instruct"
    # "pad": pad to a square with the CLIP mean colour before resizing (LLaVA v1.5); "crop": CLIP's
    # resize-and-center-crop only (LLaVA-Med v1).
    image_aspect_ratio: str = "pad"
    # LLaVA-Med v1's layout: each image is <im_start> + its patches + <im_end> where the record put "<image>"
    # (tokens added to the vocabulary), instead of v1.5's sentinel alone in front (conversation.py).
    mm_use_im_start_end: bool = False

    def __post_init__(self):
        for name, kind in (("vision", VisionConfig), ("projector", ProjectorConfig), ("decoder", DecoderConfig)):
            _require(self, name, isinstance(getattr(self, name), kind), f"must be a {kind.__name__}")
        # The template's name is checked by conversation.get_template, which sits above this module.
        _require(self, "conv_template", isinstance(self.conv_template, str) and self.conv_template != "",
                 "must name a conversation template")
        _require(self, "image_aspect_ratio", self.image_aspect_ratio in ("pad", "crop"), "choose 'pad' or 'crop'")
        _require(self, "mm_use_im_start_end", isinstance(self.mm_use_im_start_end, bool), "must be true or false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ConfigError(f"unknown {kind.__name__} field(s): {sorted(unknown)}")
            return kind(**values)

        top = {k: v for k, v in d.items() if k not in ("vision", "projector", "decoder")}
        return build(cls, {
            **top,
            "vision": build(VisionConfig, d.get("vision", {})),
            "projector": build(ProjectorConfig, d.get("projector", {})),
            "decoder": build(DecoderConfig, d.get("decoder", {})),
        })


CLIP_L14_224 = VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096)
CLIP_L14_336 = dataclasses.replace(CLIP_L14_224, image_size=336)

PRESETS: dict[str, LlavaConfig] = {
    # Small enough to train stages 0 -> 1 -> 2 on a 2-core CPU in minutes on the synthetic world.
    "tiny": LlavaConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=4, heads=4, mlp_dim=512),
        projector=ProjectorConfig("mlp2x_gelu"),
        decoder=DecoderConfig(vocab_size=2048, dim=256, layers=4, heads=4, kv_heads=2, mlp_dim=688,
                              rope_theta=10000.0, max_seq_len=512),
        # LLaVA-Med v1.5's template: no system prompt, so short samples stay short on a CPU.
        conv_template="mistral_instruct",
        image_aspect_ratio="pad",
    ),
    # LLaVA-Med v1 (paper): CLIP ViT-L/14 at 224, one linear layer, LLaMA-7B.
    "llava-med-v1-7b": LlavaConfig(
        vision=CLIP_L14_224,
        projector=ProjectorConfig("linear"),
        decoder=DecoderConfig(vocab_size=32000, dim=4096, layers=32, heads=32, kv_heads=32, mlp_dim=11008,
                              norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048),
        conv_template="llava_med_v1",
        image_aspect_ratio="crop",
        # The released v1 weights also set mm_use_im_start_end, with 3-4 more vocabulary rows; loading
        # them reads both from their config.json and tokenizer files (checkpoint.py).
    ),
    # LLaVA-Med v1.5: CLIP ViT-L/14-336, mlp2x_gelu, Mistral-7B-Instruct-v0.2.
    "llava-med-v1.5-mistral-7b": LlavaConfig(
        vision=CLIP_L14_336,
        projector=ProjectorConfig("mlp2x_gelu"),
        decoder=DecoderConfig(vocab_size=32000, dim=4096, layers=32, heads=32, kv_heads=8, mlp_dim=14336,
                              norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768),
        conv_template="mistral_instruct",
        image_aspect_ratio="pad",
    ),
}


def preset(name: str) -> LlavaConfig:
    """A fresh copy of a named preset (callers may mutate it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlavaConfig.from_dict(PRESETS[name].to_dict())
