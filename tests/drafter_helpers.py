"""Random tiny MTP drafters built and saved by transformers (shared by the drafter and
engine tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_hf_drafter(
    path: Path,
    seed: int = 1,
    text_overrides: dict[str, Any] | None = None,
    backbone_hidden_size: int = 64,
    **overrides: Any,
) -> Any:
    """A random tiny ``Gemma4UnifiedAssistantForCausalLM`` for a tiny target, saved.

    The defaults fit ``hf_reference.make_hf_model`` (vocab 300, window 16);
    ``text_overrides`` adapts the drafter's text config to another tiny target."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    text: dict[str, Any] = dict(
        model_type="gemma4_unified_text",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=16,
    )
    text.update(text_overrides or {})
    vocab = int(text["vocab_size"])
    torch.manual_seed(seed)
    cfg = Gemma4UnifiedAssistantConfig(
        text_config=text, backbone_hidden_size=backbone_hidden_size, **overrides
    )
    cfg._attn_implementation = "eager"
    model = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + 0.3 * (torch.rand(p.shape, generator=g) - 0.5))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        for layer in model.model.layers:
            layer.layer_scalar.fill_(0.5 + float(torch.rand(1, generator=g)))
        if model.masked_embedding is not None:
            model.masked_embedding.token_ordering.copy_(torch.randperm(vocab, generator=g))
    model.save_pretrained(path)
    return model
