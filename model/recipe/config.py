"""The shape of rawcast-tiny: Gemma 4 Unified at a few million parameters.

Special tokens take ids 0-11 of the tokenizer (same strings as Gemma 4), and the
model config's ``TokenIds`` point at them. Four layers, three sliding and the last
full (Gemma's 5:1 pattern, cut short: a 2-core CPU trains it in under two hours);
K = V on the full layer; a 256-token window (10 s of audio).
"""

from __future__ import annotations

from rawcast.model.config import (
    FULL,
    SLIDING,
    AudioConfig,
    ModelConfig,
    TextConfig,
    TokenIds,
    VisionConfig,
)
from rawcast.model.tokenizer import TURN_CLOSE, TURN_OPEN

# Order = token id.
SPECIALS = (
    "<pad>",
    "<eos>",
    "<bos>",
    TURN_OPEN,
    TURN_CLOSE,
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|video|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
)
TOKEN_IDS = TokenIds(pad=0, eos=1, bos=2, boi=5, eoi=6, image=7, video=8, boa=9, eoa=10, audio=11)


def tiny_config(
    vocab_size: int, layers: int = 4, hidden: int = 256, intermediate: int = 512
) -> ModelConfig:
    types = (*(SLIDING if (i + 1) % 6 else FULL for i in range(layers - 1)), FULL)
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        global_head_dim=128,
        num_global_key_value_heads=1,
        layer_types=types,
        sliding_window=256,
        attention_k_eq_v=True,
        final_logit_softcapping=30.0,
        pad_token_id=TOKEN_IDS.pad,
        bos_token_id=TOKEN_IDS.bos,
        eos_token_id=TOKEN_IDS.eos,
    )
    return ModelConfig(
        text=text,
        vision=VisionConfig(mm_embed_dim=hidden, mm_posemb_size=64, output_proj_dims=hidden),
        audio=AudioConfig(),
        tokens=TOKEN_IDS,
    )
