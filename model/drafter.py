"""The Gemma 4 multi-token-prediction drafter (``gemma4_unified_assistant``).

A small decoder (4 layers on the 12B) with NO key/value projections: every layer
attends to the TARGET's cached K/V, sliding layers to the target's last sliding
layer, full layers to its last full layer (``KVCache`` holds both, so nothing is
copied). One draft step (see ../shared/docs/gemma4-unified.md, section 6):

    x = pre_projection(cat(target.embed(token) * sqrt(H_target), h))
    x = norm(layers(x))       # query at the position of ``token``, for every step
    token = argmax(lm_head(x))   # no soft-cap; tied to the drafter's embed_tokens
    h = post_projection(x)

``h`` starts as the target's final-normed hidden state at the token before
``token`` (the one that predicted it). Masks follow transformers 5.24's
``Gemma4UnifiedAssistantForCausalLM``: full layers see every cached token; sliding
layers see the last ``sliding_window + 1`` of them (its bidirectional window
counts ``|q - kv| <= window``), one more than the target's own window. The
drafter sees only committed tokens; transformers' candidate generator, after a
partly rejected round, still passes the rejected drafts' K/V (it slices the
target's K/V from the front), so the two agree on the first round and whenever
the context is freshly prefilled, which is what the parity tests compare.

``propose`` drafts k tokens for a batch of slots (or branch buffers) in k small
forwards whose shapes depend only on (B, cached length); the cache is only read.
The optional ordered-embeddings head (``use_ordered_embeddings``: top-k centroids
pick the candidate tokens) is supported for greedy drafting.

``load`` reads a ``save_pretrained`` directory with the backbone loader's
conventions: memory-mapped safetensors, one tensor at a time, errors naming the key;
``save`` writes one that transformers loads too (the recipe's trained drafter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rawcast.model.cache import KVCache
from rawcast.model.config import ConfigError, TextConfig, _text_from_dict, text_to_dict
from rawcast.model.gemma4 import (
    MLP,
    Append,
    Gemma4Unified,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)
from rawcast.model.loader import (
    CheckpointError,
    _file_items,
    read_config,
    resolve,
    write_checkpoint,
)

ASSISTANT = "gemma4_unified_assistant"


@dataclass(frozen=True)
class DrafterConfig:
    text: TextConfig  # the drafter's own decoder; its K/V head counts are unused
    backbone_hidden_size: int  # the target's hidden size
    double_wide_mlp: bool = False  # transformers doubles the MLP of KV-shared layers
    tie_word_embeddings: bool = True
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_top_k: int = 32

    @property
    def intermediate_size(self) -> int:
        return self.text.intermediate_size * (2 if self.double_wide_mlp else 1)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> DrafterConfig:
        if d.get("model_type") != ASSISTANT:
            raise ConfigError(
                f"config.json has model_type {d.get('model_type')!r}; a drafter is {ASSISTANT!r}"
            )
        text = dict(d.get("text_config") or {})
        n_layers = text.get("num_hidden_layers")
        shared = text.pop("num_kv_shared_layers", None)
        if shared not in (None, 0, n_layers):
            raise ConfigError(
                f"num_kv_shared_layers={shared}: rawcast runs drafters whose every layer "
                f"reads the target's K/V ({n_layers})"
            )
        double = bool(text.pop("use_double_wide_mlp", False))
        cfg = DrafterConfig(
            text=_text_from_dict(text),
            backbone_hidden_size=int(d.get("backbone_hidden_size", 3840)),
            double_wide_mlp=double,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
            num_centroids=int(d.get("num_centroids", 2048)),
            centroid_top_k=int(d.get("centroid_intermediate_top_k", 32)),
        )
        if cfg.use_ordered_embeddings and cfg.text.vocab_size % cfg.num_centroids:
            raise ConfigError(
                f"vocab_size {cfg.text.vocab_size} is not a multiple of num_centroids "
                f"{cfg.num_centroids}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers 5.24 (``Gemma4UnifiedAssistantConfig``) reads."""
        text = text_to_dict(self.text)
        text["num_kv_shared_layers"] = self.text.num_hidden_layers
        text["use_double_wide_mlp"] = self.double_wide_mlp
        text["final_logit_softcapping"] = None
        return {
            "model_type": ASSISTANT,
            "architectures": ["Gemma4UnifiedAssistantForCausalLM"],
            "text_config": text,
            "backbone_hidden_size": self.backbone_hidden_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_ordered_embeddings": self.use_ordered_embeddings,
            "num_centroids": self.num_centroids,
            "centroid_intermediate_top_k": self.centroid_top_k,
        }

    def check_target(self, target: TextConfig) -> None:
        """Refuse a target whose shapes this drafter was not built for."""
        t = self.text
        if self.backbone_hidden_size != target.hidden_size:
            raise ConfigError(
                f"drafter backbone_hidden_size {self.backbone_hidden_size} != target "
                f"hidden_size {target.hidden_size}"
            )
        if t.vocab_size != target.vocab_size:
            raise ConfigError(f"drafter vocab {t.vocab_size} != target vocab {target.vocab_size}")
        for layer in range(t.num_hidden_layers):
            sliding = t.is_sliding(layer)
            kinds = target.sliding_layers if sliding else target.full_layers
            if not kinds:
                raise ConfigError(f"drafter layer {layer} needs a target {t.layer_types[layer]}")
            if t.layer_head_dim(layer) != target.layer_head_dim(kinds[-1]):
                raise ConfigError(
                    f"drafter layer {layer} head_dim {t.layer_head_dim(layer)} != the target's "
                    f"{target.layer_head_dim(kinds[-1])}"
                )
            if t.num_attention_heads % target.layer_kv_heads(kinds[-1]):
                raise ConfigError(
                    f"drafter heads {t.num_attention_heads} are not a multiple of the target's "
                    f"{target.layer_kv_heads(kinds[-1])} K/V heads"
                )


# --- modules ------------------------------------------------------------------------------


class DrafterAttention(nn.Module):
    """Queries only: keys and values are the target's, already normed and rotated."""

    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.layer_head_dim(layer)
        hid = cfg.hidden_size
        self.q_proj = nn.Linear(hid, self.heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hid, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        q = apply_rope(q, cos, sin).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1]
        )
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig, layer: int) -> None:
        super().__init__()
        t = cfg.text
        eps = t.rms_norm_eps
        self.sliding = t.is_sliding(layer)
        self.self_attn = DrafterAttention(t, layer)
        self.mlp = MLP(t.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(t.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(t.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(t.hidden_size, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)


class MaskedEmbedding(nn.Module):
    """Ordered-embeddings head: the top-k centroids choose which tokens get a logit."""

    token_ordering: torch.Tensor

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.top_k = cfg.centroid_top_k
        self.num_centroids = cfg.num_centroids
        self.centroids = nn.Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(cfg.text.vocab_size, dtype=torch.long))

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H) -> the token ids (B, top_k * vocab / centroids) that get a logit."""
        top = self.centroids(x).topk(self.top_k, dim=-1).indices
        per = self.token_ordering.view(self.num_centroids, -1)
        return per[top].reshape(x.shape[0], -1)


class Drafter(nn.Module):
    inv_freq_sliding: torch.Tensor
    inv_freq_full: torch.Tensor

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DrafterLayer(cfg, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head: nn.Linear | None = (
            None if cfg.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        )
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, cfg.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedding(cfg) if cfg.use_ordered_embeddings else None
        self.register_buffer(
            "inv_freq_sliding", rope_inv_freq(t.rope_sliding, t.head_dim), persistent=False
        )
        self.register_buffer(
            "inv_freq_full", rope_inv_freq(t.rope_full, t.global_head_dim), persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_projection.weight.dtype

    def decode(
        self,
        x: torch.Tensor,
        rope: dict[bool, tuple[torch.Tensor, torch.Tensor]],
        kv: dict[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Pre-projected inputs (B, T, H) -> final-normed drafter states (B, T, H)."""
        for layer in self.layers:
            assert isinstance(layer, DrafterLayer)
            h = layer.input_layernorm(x)
            x = x + layer.post_attention_layernorm(
                layer.self_attn(h, *rope[layer.sliding], *kv[layer.sliding])
            )
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            x = x * layer.layer_scalar
        return self.norm(x)

    def visible(self, kv_pos: torch.Tensor, q_pos: torch.Tensor, sliding: bool) -> torch.Tensor:
        """Which target K/V entries (positions (B, K), -1: empty) the draft queries at
        ``q_pos`` (B, Tq) attend to: (B, 1, Tq, K). Strictly earlier positions; sliding
        layers only the last ``sliding_window + 1`` (transformers' assistant mask)."""
        kp, qp = kv_pos[:, None, :], q_pos[:, :, None]
        seen = (kp >= 0) & (kp < qp)
        if sliding:
            seen &= kp >= qp - (self.cfg.text.sliding_window + 1)
        return seen[:, None]

    def rope(self, q_pos: torch.Tensor) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """Rotary tables of the draft queries, per layer kind (key: sliding?)."""
        return {
            True: rope_cos_sin(q_pos, self.inv_freq_sliding, self.dtype),
            False: rope_cos_sin(q_pos, self.inv_freq_full, self.dtype),
        }

    def embed_target(self, target: Gemma4Unified, tok: torch.Tensor) -> torch.Tensor:
        """The target's scaled embedding of ``tok``: a draft step's token input."""
        w = target.embed_tokens.weight
        scale = torch.tensor(target.cfg.text.hidden_size**0.5).to(w.dtype)
        return (F.embedding(tok, w) * scale).to(self.dtype)

    def draft_step(
        self,
        e: torch.Tensor,
        h: torch.Tensor,
        rope: dict[bool, tuple[torch.Tensor, torch.Tensor]],
        kv: dict[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """One draft step for queries (B, T): token embeddings ``e`` and the previous states
        ``h`` (B, T, H_target) -> final-normed drafter states (B, T, H)."""
        return self.decode(self.pre_projection(torch.cat([e, h], dim=-1)), rope, kv)

    def greedy(self, x: torch.Tensor, suppress: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed states (B, H) -> the argmax token (B,), ``suppress`` ids excluded."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.masked_embedding is None:
            logits = F.linear(x, w).float()
            if suppress is not None:
                logits = logits.index_fill(-1, suppress, float("-inf"))
            return logits.argmax(-1)
        cand = self.masked_embedding.candidates(x)
        logits = torch.einsum("bh,bsh->bs", x, w[cand]).float()
        if suppress is not None:
            logits = logits.masked_fill(torch.isin(cand, suppress), float("-inf"))
        return cand.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)

    @torch.inference_mode()
    def propose(
        self,
        target: Gemma4Unified,
        cache: KVCache,
        rows: Sequence[Append],
        hidden: torch.Tensor,
        k: int,
        suppress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft ``k`` greedy tokens (B, k) after each row's newest token.

        Each row names a slot (or a branch buffer over it) and carries ONE token: the
        newest greedy token, not yet in the cache. ``hidden`` (B, H_target) holds the
        target's final-normed hidden state at the token before it (``step_hidden``).
        The cache is read, never written.
        """
        p = target.pack(rows, cache, pad_to=1)
        tt = target.cfg.text
        dt = self.dtype
        q_pos = p.positions  # (B, 1): every draft step queries at the newest token's position
        kv: dict[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for sliding, layers in ((True, tt.sliding_layers), (False, tt.full_layers)):
            if not layers or not any(lay.sliding == sliding for lay in self.layers):
                continue
            kk, vv, pos = target.cached_kv(p, cache, layers[-1])
            kv[sliding] = (kk.to(dt), vv.to(dt), self.visible(pos, q_pos, sliding))
        rope = self.rope(q_pos)
        tok = p.input_ids[:, :1]
        h = hidden.to(dt)[:, None]
        out = []
        for _ in range(k):
            x = self.draft_step(self.embed_target(target, tok), h, rope, kv)
            tok = self.greedy(x[:, 0], suppress)[:, None]
            h = self.post_projection(x)
            out.append(tok)
        if not out:
            return torch.zeros((len(rows), 0), dtype=torch.long, device=q_pos.device)
        return torch.cat(out, dim=1)


# --- loading ------------------------------------------------------------------------------


def canonical_key(key: str) -> str | None:
    """Map a drafter checkpoint key to its parameter name (None: ignore it)."""
    if "rotary_emb." in key:
        return None
    if key.startswith("model."):
        return key.removeprefix("model.")
    if key in ("lm_head.weight", "pre_projection.weight", "post_projection.weight"):
        return key
    if key.startswith("masked_embedding."):
        return key
    return "?" + key


def checkpoint_key(name: str) -> str:
    """The key ``save_pretrained`` writes for parameter ``name`` (inverse of canonical_key)."""
    if name.startswith(("pre_projection.", "post_projection.", "lm_head.", "masked_embedding.")):
        return name
    return "model." + name


def save(model: Drafter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors that both rawcast and transformers load."""
    return write_checkpoint(path, model.cfg.to_dict(), model.state_dict(), checkpoint_key, dtype)


def load_config(path: Path) -> DrafterConfig:
    return read_config(path, DrafterConfig.from_dict)


def _assign(
    model: Drafter,
    items: Iterable[tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for source, key, shape, read in items:
        name = canonical_key(key)
        if name is None or (name == "lm_head.weight" and model.lm_head is None):
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {key!r}")
        want, kind = expected[name]
        if shape != want:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {shape}, expected {want} from config.json"
            )
        state[name] = read().to(device=device, dtype=dtype if kind.is_floating_point else kind)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"missing tensor(s) {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True, assign=True)
    t = model.cfg.text
    model.inv_freq_sliding = rope_inv_freq(t.rope_sliding, t.head_dim).to(device)
    model.inv_freq_full = rope_inv_freq(t.rope_full, t.global_head_dim).to(device)


def load(
    path_or_name: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    target: Gemma4Unified | None = None,
) -> Drafter:
    """Load a drafter checkpoint directory; with ``target``, check that they fit together."""
    path = resolve(path_or_name)
    cfg = load_config(path)
    if target is not None:
        try:
            cfg.check_target(target.cfg.text)
        except ConfigError as e:
            raise CheckpointError(f"{path}: drafter does not fit the target: {e}") from None
    with torch.device("meta"):
        model = Drafter(cfg)
    try:
        _assign(model, _file_items(path), torch.device(device), dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.eval()
