"""Tiny random Gemma 4 Unified checkpoints written by transformers, and its reference logits.

Reference logits use transformers' static-cache mask path
(``create_masks_for_generate`` with ``mm_token_type_ids``), which has the
reference semantics: full layers causal, sliding layers causal-or-same-block
within the window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IMAGE, AUDIO, BOI, EOI, BOA, EOA, VIDEO = 290, 291, 292, 293, 294, 295, 296


def tiny_config(**text_overrides: Any) -> Any:
    from transformers import Gemma4UnifiedConfig

    text = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
        final_logit_softcapping=30.0,
    )
    text.update(text_overrides)
    return Gemma4UnifiedConfig(
        text_config=text,
        vision_config=dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=64),
        audio_config=dict(),
        image_token_id=IMAGE,
        audio_token_id=AUDIO,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        boa_token_id=BOA,
        eoa_token_index=EOA,
        video_token_id=VIDEO,
    )


def make_hf_model(path: Path, seed: int = 0, **text_overrides: Any) -> Any:
    """Build, randomise (norm weights away from 1, see spec section 10) and save a model."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_config(**text_overrides)
    cfg._attn_implementation = "eager"
    model = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "vision" not in name and "patch" not in name:
                p.copy_(0.5 + 0.3 * (torch.rand(p.shape, generator=g) - 0.5))
            elif "pos_embedding" in name or name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for layer in model.model.language_model.layers:
            layer.layer_scalar.fill_(0.5 + float(torch.rand(1, generator=g)))
    model.save_pretrained(path)
    return model


def hf_logits(
    model: Any,
    ids: torch.Tensor,
    audio: torch.Tensor | None = None,
    images: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Reference logits (T, V) for one prompt with transformers' reference-mask path."""
    images = images or []
    ids2 = ids.view(1, -1)
    tt = torch.zeros_like(ids2)
    tt[ids2 == IMAGE] = 1
    tt[ids2 == AUDIO] = 3
    kwargs: dict[str, Any] = {}
    if images:
        n = max(c.shape[0] for c, _ in images)
        pv = torch.zeros(len(images), n, images[0][0].shape[1])
        pp = torch.full((len(images), n, 2), -1, dtype=torch.long)
        for i, (c, p) in enumerate(images):
            pv[i, : c.shape[0]] = c
            pp[i, : c.shape[0]] = p
        kwargs.update(pixel_values=pv, image_position_ids=pp)
    if audio is not None:
        kwargs.update(
            input_features=audio.view(1, -1, audio.shape[-1]),
            input_features_mask=torch.ones(1, audio.shape[0], dtype=torch.bool),
        )
    hidden = model.config.text_config.hidden_size
    with torch.no_grad():
        masks = model.create_masks_for_generate(
            config=model.config,
            inputs_embeds=torch.zeros(1, ids2.shape[1], hidden),
            attention_mask=None,
            cache=None,
            position_ids=torch.arange(ids2.shape[1]).view(1, -1),
            mm_token_type_ids=tt,
        )
        out = model(
            input_ids=ids2, attention_mask=masks, mm_token_type_ids=tt, use_cache=False, **kwargs
        )
    return out.logits[0].float()


def prompt(
    n_text: int, n_audio: int, image_cells: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A prompt with text, images (grids of the given cell counts) and audio, plus media."""
    g = torch.Generator().manual_seed(seed)
    toks: list[int] = [2]
    toks += torch.randint(3, 280, (n_text,), generator=g).tolist()
    images = []
    for n in image_cells:
        cols = max(1, int(n**0.5))
        rows = (n + cols - 1) // cols
        cells = torch.rand(n, 6912, generator=g)
        pos = torch.tensor([[i % cols, i // cols] for i in range(n)], dtype=torch.long)
        assert rows * cols >= n
        images.append((cells, pos))
        toks += [BOI] + [IMAGE] * n + [EOI]
        toks += torch.randint(3, 280, (3,), generator=g).tolist()
    audio = None
    if n_audio:
        audio = 0.3 * torch.randn(n_audio, 640, generator=g)
        toks += [BOA] + [AUDIO] * n_audio + [EOA]
    toks += torch.randint(3, 280, (4,), generator=g).tolist()
    return torch.tensor(toks), audio, images
