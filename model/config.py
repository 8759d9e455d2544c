"""Gemma 4 Unified configuration as frozen dataclasses.

``ModelConfig.from_dict`` reads a checkpoint's ``config.json`` (model_type
``gemma4_unified``, nested text/vision/audio configs); unknown keys are ignored.
Per-layer overrides come either as ``per_layer_config`` (what ``save_pretrained``
writes, keys possibly zero-padded) or as ``global_head_dim`` /
``num_global_key_value_heads`` (the hub config). Features that the reference
12B checkpoint does not use (KV sharing, double-wide MLP, all-bidirectional
attention) are refused with a clear error instead of being run wrongly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json that rawcast cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_fraction: float = 1.0  # "proportional": the share of dim pairs that rotate
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int
    attention_k_eq_v: bool
    final_logit_softcapping: float | None
    rms_norm_eps: float = 1e-6
    use_bidirectional_attention: str | None = "vision"
    rope_sliding: RopeConfig = RopeConfig(theta=10_000.0)
    rope_full: RopeConfig = RopeConfig(theta=1_000_000.0, rotary_fraction=0.25)
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return (
            self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads
        )

    def layer_has_v_proj(self, layer: int) -> bool:
        return self.is_sliding(layer) or not self.attention_k_eq_v

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)


# Images per picture in soft tokens (one per 48-px cell): the reference's choices and
# default. A checkpoint names its own in preprocessor_config.json (``loader.load``).
SOFT_TOKEN_BUDGETS: Final = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS: Final = 280


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def cell_values(self) -> int:
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3


@dataclass(frozen=True)
class AudioConfig:
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class TokenIds:
    pad: int = 0
    eos: int = 1
    bos: int = 2
    boi: int = 255_999
    eoi: int = 258_882
    image: int = 258_880
    video: int = 258_884
    boa: int = 256_000
    eoa: int = 258_883
    audio: int = 258_881


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    tokens: TokenIds = field(default_factory=TokenIds)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != "gemma4_unified":
            raise ConfigError(
                f"config.json has model_type {model_type!r}; "
                "rawcast runs 'gemma4_unified' checkpoints"
            )
        text = _text_from_dict(d.get("text_config") or {})
        vd = d.get("vision_config")
        ad = d.get("audio_config")
        vision = _pick(VisionConfig, vd) if vd is not None else None
        audio = _pick(AudioConfig, ad) if ad is not None else None
        if vision is not None and vision.mm_embed_dim != vision.output_proj_dims:
            raise ConfigError(
                "vision_config.mm_embed_dim must equal output_proj_dims "
                f"({vision.mm_embed_dim} != {vision.output_proj_dims})"
            )
        tokens = TokenIds(
            pad=text.pad_token_id,
            eos=text.eos_token_id,
            bos=text.bos_token_id,
            boi=d.get("boi_token_id", TokenIds.boi),
            eoi=d.get("eoi_token_id", TokenIds.eoi),
            image=d.get("image_token_id", TokenIds.image),
            video=d.get("video_token_id", TokenIds.video),
            boa=d.get("boa_token_id", TokenIds.boa),
            eoa=d.get("eoa_token_index", d.get("eoa_token_id", TokenIds.eoa)),
            audio=d.get("audio_token_id", TokenIds.audio),
        )
        return ModelConfig(text=text, vision=vision, audio=audio, tokens=tokens)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers 5.24 and rawcast both read."""
        text = text_to_dict(self.text)
        t = self.text
        out: dict[str, Any] = {
            "model_type": "gemma4_unified",
            "architectures": ["Gemma4UnifiedForConditionalGeneration"],
            "text_config": text,
            "tie_word_embeddings": t.tie_word_embeddings,
            "boi_token_id": self.tokens.boi,
            "eoi_token_id": self.tokens.eoi,
            "image_token_id": self.tokens.image,
            "video_token_id": self.tokens.video,
            "boa_token_id": self.tokens.boa,
            "eoa_token_index": self.tokens.eoa,
            "audio_token_id": self.tokens.audio,
        }
        if self.vision is not None:
            out["vision_config"] = {
                "model_type": "gemma4_unified_vision",
                **dataclasses.asdict(self.vision),
            }
        if self.audio is not None:
            out["audio_config"] = {
                "model_type": "gemma4_unified_audio",
                **dataclasses.asdict(self.audio),
            }
        return out


def text_to_dict(t: TextConfig) -> dict[str, Any]:
    """The ``text_config`` of a config.json (transformers 5.24 and rawcast read it)."""
    text: dict[str, Any] = {
        "model_type": "gemma4_unified_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "layer_types": list(t.layer_types),
        "sliding_window": t.sliding_window,
        "attention_k_eq_v": t.attention_k_eq_v,
        "final_logit_softcapping": t.final_logit_softcapping,
        "rms_norm_eps": t.rms_norm_eps,
        "use_bidirectional_attention": t.use_bidirectional_attention,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": t.tie_word_embeddings,
        "pad_token_id": t.pad_token_id,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": t.rope_sliding.theta},
            FULL: {
                "rope_type": "proportional",
                "rope_theta": t.rope_full.theta,
                "partial_rotary_factor": t.rope_full.rotary_fraction,
            },
        },
        "per_layer_config": {
            str(i): {
                "head_dim": t.global_head_dim,
                "num_key_value_heads": t.num_global_key_value_heads,
            }
            for i in t.full_layers
        },
    }
    return text


def _pick(cls: Any, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _rope(d: dict[str, Any] | None, default: RopeConfig) -> RopeConfig:
    if not d:
        return default
    kind = d.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise ConfigError(f"rope_type {kind!r} is not supported (expected default or proportional)")
    fraction = float(d.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
    return RopeConfig(
        theta=float(d.get("rope_theta", default.theta)),
        rotary_fraction=fraction,
        factor=float(d.get("factor", 1.0)),
    )


def _text_from_dict(d: dict[str, Any]) -> TextConfig:
    if d.get("num_kv_shared_layers", 0):
        raise ConfigError("num_kv_shared_layers > 0 (KV sharing) is not supported by rawcast")
    if d.get("use_double_wide_mlp", False):
        raise ConfigError("use_double_wide_mlp is not supported by rawcast")
    if d.get("enable_moe_block", False) or d.get("num_experts"):
        raise ConfigError("mixture-of-experts layers are not supported by rawcast")
    if d.get("hidden_size_per_layer_input"):
        raise ConfigError("per-layer input embeddings are not supported by rawcast")
    bidir = d.get("use_bidirectional_attention", "vision")
    if bidir not in ("vision", None):
        raise ConfigError(f"use_bidirectional_attention={bidir!r} is not supported (use 'vision')")
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    try:
        n_layers = int(d["num_hidden_layers"])
        hidden = int(d["hidden_size"])
    except KeyError as e:
        raise ConfigError(f"text_config is missing {e.args[0]!r}") from None
    layer_types = d.get("layer_types") or [
        SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
    ]
    layer_types = list(layer_types)
    if len(layer_types) != n_layers or any(t not in (SLIDING, FULL) for t in layer_types):
        raise ConfigError(f"layer_types must list {n_layers} of {SLIDING!r}/{FULL!r}")
    layer_types[-1] = FULL  # transformers forces the last layer to full attention
    k_eq_v = bool(d.get("attention_k_eq_v", False))
    heads = int(d.get("num_attention_heads", 8))
    kv_heads = int(d.get("num_key_value_heads", 4))
    head_dim = int(d.get("head_dim", 256))
    g_dim = int(d.get("global_head_dim", 512))
    g_heads_raw = d.get("num_global_key_value_heads")
    g_heads = int(g_heads_raw) if (g_heads_raw is not None and k_eq_v) else kv_heads
    per_layer = d.get("per_layer_config")
    if per_layer:
        full_overrides = []
        for key, over in per_layer.items():
            idx = int(key)  # save_pretrained zero-pads ("05") once there are >= 10 layers
            if layer_types[idx] == FULL:
                full_overrides.append(
                    (
                        int(over.get("head_dim", head_dim)),
                        int(over.get("num_key_value_heads", kv_heads)),
                    )
                )
        if full_overrides:
            if len(set(full_overrides)) != 1:
                raise ConfigError(
                    "full-attention layers with differing head shapes are not supported"
                )
            g_dim, g_heads = full_overrides[0]
        else:
            g_dim, g_heads = head_dim, kv_heads
    rope = d.get("rope_parameters") or {}
    softcap = d.get("final_logit_softcapping")
    return TextConfig(
        vocab_size=int(d.get("vocab_size", 262_144)),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        global_head_dim=g_dim,
        num_global_key_value_heads=g_heads,
        layer_types=tuple(layer_types),
        sliding_window=int(d.get("sliding_window", 1024)),
        attention_k_eq_v=k_eq_v,
        final_logit_softcapping=float(softcap) if softcap is not None else None,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        use_bidirectional_attention=bidir,
        rope_sliding=_rope(rope.get(SLIDING), RopeConfig(theta=10_000.0)),
        rope_full=_rope(rope.get(FULL), RopeConfig(theta=1_000_000.0, rotary_fraction=0.25)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        pad_token_id=int(d.get("pad_token_id") or 0),
        bos_token_id=int(d.get("bos_token_id") or 2),
        eos_token_id=_first(d.get("eos_token_id"), 1),
    )


def _first(v: Any, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, list):
        return int(v[0]) if v else default
    return int(v)


def _pattern(n_layers: int, every: int = 6) -> tuple[str, ...]:
    """Gemma's 5:1 sliding:full pattern; the last layer is always full (as transformers forces)."""
    kinds = [SLIDING if (i + 1) % every else FULL for i in range(n_layers)]
    kinds[-1] = FULL
    return tuple(kinds)


def preset(name: str) -> ModelConfig:
    """Named configs: ``tiny`` (tests), ``gemma4-12b`` (the real shape), ``12b-shaped-L<n>``."""
    if name == "tiny":
        text = TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            layer_types=_pattern(6),
            sliding_window=16,
            attention_k_eq_v=True,
            final_logit_softcapping=30.0,
        )
        toks = TokenIds(boi=500, eoi=501, image=502, video=503, boa=504, eoa=505, audio=506)
        return ModelConfig(
            text=text,
            vision=VisionConfig(mm_embed_dim=64, mm_posemb_size=64, output_proj_dims=64),
            audio=AudioConfig(),
            tokens=toks,
        )
    n_layers = 48
    if name.startswith("12b-shaped-L"):
        n_layers = int(name.removeprefix("12b-shaped-L"))
    elif name != "gemma4-12b":
        raise KeyError(f"unknown preset {name!r}: tiny, gemma4-12b, 12b-shaped-L<n>")
    text = TextConfig(
        vocab_size=262_144,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=n_layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=1,
        layer_types=_pattern(n_layers),
        sliding_window=1024,
        attention_k_eq_v=True,
        final_logit_softcapping=30.0,
    )
    return ModelConfig(text=text)
