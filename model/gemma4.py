"""The Gemma 4 Unified backbone: decoder, audio and vision embedders, one ragged step.

One file for the architecture (see ../shared/docs/gemma4-unified.md):

- RMSNorm in fp32 with the weight used as is (no ``1 + w``); values normed
  without weight; K = V before k_norm/RoPE on full layers (``attention_k_eq_v``).
- RoPE per layer kind: default over ``head_dim`` on sliding layers,
  "proportional" on full layers (only the first ``fraction * D / 2`` frequency
  pairs rotate, the rest have inv_freq 0).
- Reference mask semantics: full layers causal; sliding layers
  ``(kv <= q OR same image block) AND kv > q - window``.

``forward_packed`` runs ONE ragged batch: each row is one cache slot appending
its own tokens (text, audio frames, a whole patch grid, or one decode token) at
its own positions. Attention for a row covers the slot's cached K/V (gathered,
fixed capacity) plus the row's new K/V, with a boolean mask computed from the
cache's position tables, so shapes depend only on (batch, bucketed length).
Nothing here syncs with the device; compile and CUDA graphs are applied from
outside. ``logits()`` is the one-pass reference entry point used by parity tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rawcast.model.cache import KVCache
from rawcast.model.config import DEFAULT_SOFT_TOKENS, ModelConfig, RopeConfig, TextConfig
from rawcast.model.tokenizer import Tokenizer

# --- pure functions -----------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32 (w used as is, no 1 + w)."""
    w = weight.float() if weight is not None else None
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).type_as(x)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """inv_freq of length head_dim / 2; proportional RoPE zeroes the non-rotating pairs."""
    rotating = int(rope.rotary_fraction * head_dim // 2)
    exps = torch.arange(0, 2 * rotating, 2, dtype=torch.int64).float() / head_dim
    inv = 1.0 / (rope.theta**exps)
    if rotating < head_dim // 2:
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - rotating)])
    return inv / rope.factor


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def block_ids(input_ids: torch.Tensor, image_id: int, video_id: int) -> torch.Tensor:
    """Runs of image/video placeholders -> block index per row (-1 elsewhere)."""
    is_vis = ((input_ids == image_id) | (input_ids == video_id)).long()
    starts = is_vis * (1 - F.pad(is_vis[:, :-1], (1, 0)))  # integer math: inductor-friendly
    ids = torch.cumsum(starts, dim=1) - 1
    return torch.where(is_vis > 0, ids, torch.full_like(ids, -1))


# --- modules ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.layer_kv_heads(layer)
        self.head_dim = cfg.layer_head_dim(layer)
        self.eps = cfg.rms_norm_eps
        hid = cfg.hidden_size
        self.q_proj = nn.Linear(hid, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hid, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = (
            nn.Linear(hid, self.kv_heads * self.head_dim, bias=False)
            if cfg.layer_has_v_proj(layer)
            else None
        )
        self.o_proj = nn.Linear(self.heads * self.head_dim, hid, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, Hkv, T, D) of the new tokens."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k_raw = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).view(b, t, self.kv_heads, -1)
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = rms_norm(v_raw, None, self.eps).transpose(1, 2)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.sliding = cfg.is_sliding(layer)
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)


class VisionEmbedder(nn.Module):
    """6912 raw values -> LN -> Dense -> LN -> + 2-D positions -> LN -> RMSNorm -> Linear."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.vision is not None
        v = cfg.vision
        self.eps = v.rms_norm_eps
        self.patch_ln1 = nn.LayerNorm(v.cell_values)
        self.patch_dense = nn.Linear(v.cell_values, v.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(v.mm_embed_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(v.mm_posemb_size, 2, v.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(v.mm_embed_dim)
        self.embedding_projection = nn.Linear(v.output_proj_dims, cfg.text.hidden_size, bias=False)

    def forward(self, cells: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.patch_ln2(
            self.patch_dense(self.patch_ln1(cells.to(self.patch_dense.weight.dtype)))
        )
        clamped = positions.clamp(min=0).long()
        valid = (positions != -1).to(h.dtype).unsqueeze(-1)
        axes = torch.arange(2, device=positions.device)
        h = self.pos_norm(h + (self.pos_embedding[clamped, axes] * valid).sum(-2))
        return self.embedding_projection(rms_norm(h, None, self.eps))


class AudioEmbedder(nn.Module):
    """640 raw samples -> RMSNorm (no weight) -> Linear."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.audio is not None
        self.eps = cfg.audio.rms_norm_eps
        self.embedding_projection = nn.Linear(
            cfg.audio.audio_embed_dim, cfg.text.hidden_size, bias=False
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(rms_norm(x, None, self.eps))


# --- the ragged batch ---------------------------------------------------------------------


@dataclass
class Append:
    """One row of a step: ``tokens`` appended to ``slot``; placeholders filled in order.

    ``audio`` (n, 640) fills the audio placeholders, ``images`` (cells (n, 6912),
    positions (n, 2)) fill the image placeholders. A patch grid must be appended
    whole in one row (its cells attend to each other both ways).

    With ``branch`` set, the row continues branch buffer ``branch`` on top of the
    slot's cached prefix: the slot is read, never written, so several branches
    (e.g. one per task) decode together over one shared prefix.
    """

    slot: int
    tokens: Sequence[int] | torch.Tensor
    audio: torch.Tensor | None = None
    images: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    branch: int | None = None  # write to this branch buffer; the slot is a read-only prefix


@dataclass
class Packed:
    """Device tensors of one ragged step. Shapes depend on (B, T) only."""

    slots: torch.Tensor  # (B,)
    slot_list: list[int]  # host copy of ``slots``
    input_ids: torch.Tensor  # (B, T), pad id where invalid
    valid: torch.Tensor  # (B, T) bool
    positions: torch.Tensor  # (B, T) absolute positions
    last: torch.Tensor  # (B,) index of the last real token of each row
    lengths: list[int]  # host: real tokens per row
    audio: torch.Tensor | None  # (Na, 640) in row-major placeholder order
    cells: torch.Tensor | None  # (Nc, 6912)
    cell_positions: torch.Tensor | None  # (Nc, 2)
    branch_list: list[int | None] = field(default_factory=list)  # host: branch per row
    branches: torch.Tensor | None = None  # (B,) branch buffer row (the empty row if none)
    is_branch: torch.Tensor | None = None  # (B,) bool
    bases: torch.Tensor | None = None  # (B,) position of each branch's first token
    first_slot: int = -1  # the first slot when the slots are consecutive, else -1


@dataclass
class StepPlan:
    """What a cached step reads and writes (see ``Gemma4Unified.plan``)."""

    kv_len: dict[bool | None, int]  # entries read per buffer kind (sliding, full, branch)
    masks: dict[bool, torch.Tensor]  # (B, 1, T, K + T) per layer kind (key: sliding?)
    write_idx: dict[bool, torch.Tensor]  # (B, T) buffer index of each new token
    branch_idx: torch.Tensor | None  # (B, T) branch buffer index, or None


def _fill(x: torch.Tensor, mask: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, H) with the positions where ``mask`` is set taken, in row-major order,
    from the rows of ``src`` (N, H). Like ``masked_scatter``, but also for N = 0 and in
    shapes an ONNX export keeps dynamic."""
    idx = (mask.reshape(-1).long().cumsum(0) - 1).clamp(min=0).view(mask.shape)
    src = torch.cat([src.to(x.dtype), x.new_zeros(1, x.shape[-1])])  # a row for N = 0
    return torch.where(mask.unsqueeze(-1), src[idx], x)


def _rows(buf: torch.Tensor, p: Packed, length: int, dim: int) -> torch.Tensor:
    """The cache rows of the step's slots, first ``length`` entries along ``dim``.

    A view when the slots are consecutive (``p.first_slot``), else a gather.
    """
    if p.first_slot >= 0:
        return buf.narrow(0, p.first_slot, p.slots.shape[0]).narrow(dim, 0, length)
    return buf.narrow(dim, 0, length).index_select(0, p.slots)


def _kv_bucket(n: int, full: int) -> int:
    """Entries of a buffer worth attending to: a power-of-two bucket >= n, at most ``full``.

    Entries past a slot's length are empty, so attention need not read them; a
    handful of bucket sizes keeps the shapes static for compilers and CUDA graphs.
    """
    return min(full, max(64, 1 << max(0, math.ceil(math.log2(max(1, n))))))


def bucket(n: int) -> int:
    """Round a row length up so that a few static shapes cover all steps."""
    if n <= 8:
        return 1 if n == 1 else 8
    return 1 << math.ceil(math.log2(n))


class Gemma4Unified(nn.Module):
    inv_freq_sliding: torch.Tensor
    inv_freq_full: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer: Tokenizer | None = None
        # Soft tokens per picture that the checkpoint was made for (its processor
        # setting, preprocessor_config.json): what the engine patches pictures to.
        self.image_budget = DEFAULT_SOFT_TOKENS
        # Few shapes of step for compilers (``rawcast.transports.runtime.compile_step``
        # sets it): cached steps always carry audio and branch rows and read slots by
        # gather, so that only one row or several, one token or several, and an image or
        # not make graphs.
        self.static_steps = False
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head: nn.Linear | None = (
            None if t.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        )
        self.vision = VisionEmbedder(cfg) if cfg.vision is not None else None
        self.audio = AudioEmbedder(cfg) if cfg.audio is not None else None
        self.register_buffer(
            "inv_freq_sliding", rope_inv_freq(t.rope_sliding, t.head_dim), persistent=False
        )
        self.register_buffer(
            "inv_freq_full", rope_inv_freq(t.rope_full, t.global_head_dim), persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # --- packing (host) ---

    def pack(
        self, rows: Sequence[Append], cache: KVCache | None, pad_to: int | None = None
    ) -> Packed:
        """Host lists -> the step's device tensors. Everything per row is plain Python
        and two tensors are made (ids, positions and validity as one (3, B, T); the
        per-row ints as one (5, B)): tensor creation, not arithmetic, is what a batch-1
        decode step's host work costs."""
        if not rows:
            raise ValueError("a step needs at least one row")
        dev = self.device
        toks = [r.tokens.reshape(-1).tolist() if isinstance(r.tokens, torch.Tensor)
                else list(r.tokens) for r in rows]  # fmt: skip
        lengths = [len(x) for x in toks]
        if min(lengths) == 0:
            raise ValueError("every row of a step must append at least one token")
        slots = [r.slot for r in rows]
        main = [r.slot for r in rows if r.branch is None]
        brs = [r.branch for r in rows if r.branch is not None]
        if len(set(main)) != len(main):
            raise ValueError(f"a slot may be appended to once per step, got {main}")
        if len(set(brs)) != len(brs):
            raise ValueError(f"a branch may appear once per step, got {brs}")
        if set(main) & {r.slot for r in rows if r.branch is not None}:
            raise ValueError("a slot cannot be appended to while its branches decode in the step")
        t_max = max(lengths)
        width = pad_to if pad_to is not None else bucket(t_max)
        if width < t_max:
            raise ValueError(f"pad_to={width} is shorter than the longest row ({t_max})")
        pad = self.cfg.tokens.pad
        starts, bases = [], []
        for x, r in zip(toks, rows, strict=True):
            start = base = 0
            if cache is not None:
                base = start = cache.length(r.slot)
                if r.branch is None:
                    cache.check_room(r.slot, len(x))
                else:
                    cache.check_branch_room(r.branch, len(x))
                    start += cache.branch_length(r.branch)
            elif r.branch is not None:
                raise ValueError("branch rows need a cache")
            starts.append(start)
            bases.append(base)
        static = self.static_steps and cache is not None
        audio, cells, cell_pos = self._gather_media(rows, toks, fill=static)
        grid = torch.tensor(
            [
                [x + [pad] * (width - len(x)) for x in toks],
                [list(range(st, st + width)) for st in starts],
                [[1] * n + [0] * (width - n) for n in lengths],
            ],
            dtype=torch.long,
        ).to(dev)  # (3, B, T): ids, positions, valid
        no_branch = cache.spec.branches if cache is not None else 0
        table = torch.tensor(
            [
                slots,
                [n - 1 for n in lengths],
                bases,
                [no_branch if r.branch is None else r.branch for r in rows],
                [r.branch is not None for r in rows],
            ],
            dtype=torch.long,
        ).to(dev)  # (5, B)
        return Packed(
            slots=table[0],
            slot_list=slots,
            input_ids=grid[0],
            valid=grid[2].bool(),
            positions=grid[1],
            last=table[1],
            lengths=lengths,
            audio=audio,
            cells=cells,
            cell_positions=cell_pos,
            branch_list=[r.branch for r in rows],
            branches=table[3] if cache is not None and (brs or static) else None,
            is_branch=table[4].bool(),
            bases=table[2],
            first_slot=slots[0]
            if not static and slots == list(range(slots[0], slots[0] + len(slots)))
            else -1,
        )

    def _gather_media(
        self, rows: Sequence[Append], toks: Sequence[list[int]], fill: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The rows' audio frames, image cells and cell positions, in placeholder order.

        ``fill`` (static steps): audio never None, and audio and cells (when there are
        any) at least two rows, padded with zeros that no placeholder takes (a missing
        tensor, or one of a single row, would each be a graph of its own for
        ``torch.compile``). Cells stay None without an image: running the vision
        embedder on padding every step would cost more than the two graphs it saves."""
        tk = self.cfg.tokens
        audio_parts: list[torch.Tensor] = []
        cell_parts: list[torch.Tensor] = []
        pos_parts: list[torch.Tensor] = []
        for r, x in zip(rows, toks, strict=True):
            n_audio = x.count(tk.audio)
            got = 0 if r.audio is None else int(r.audio.shape[0])
            if n_audio != got:
                raise ValueError(f"slot {r.slot}: {n_audio} audio placeholders but {got} frames")
            if r.audio is not None and got:
                if r.audio.ndim != 2 or self.cfg.audio is None:
                    raise ValueError("audio must be (n, 640) and the model must have audio")
                if r.audio.shape[1] != self.cfg.audio.audio_embed_dim:
                    raise ValueError(
                        f"audio frames have {r.audio.shape[1]} samples, "
                        f"expected {self.cfg.audio.audio_embed_dim}"
                    )
                audio_parts.append(r.audio)
            n_img = x.count(tk.image) + x.count(tk.video)
            n_cells = sum(int(c.shape[0]) for c, _ in r.images)
            if n_img != n_cells:
                raise ValueError(f"slot {r.slot}: {n_img} image placeholders but {n_cells} cells")
            for c, p in r.images:
                cell_parts.append(c)
                pos_parts.append(p)
        if fill:
            if self.audio is not None and self.cfg.audio is not None:
                n = 2 - sum(len(a) for a in audio_parts)
                if n > 0:
                    audio_parts.append(torch.zeros(n, self.cfg.audio.audio_embed_dim))
            if cell_parts and sum(len(c) for c in cell_parts) < 2:
                cell_parts.append(torch.zeros(1, cell_parts[0].shape[1]))
                pos_parts.append(torch.zeros(1, 2, dtype=torch.long))
        if not audio_parts and not cell_parts:
            return None, None, None
        dev = self.device
        audio = torch.cat(audio_parts).to(dev) if audio_parts else None
        cells = torch.cat(cell_parts).to(dev) if cell_parts else None
        cpos = torch.cat(pos_parts).to(dev).long() if pos_parts else None
        if cells is not None and self.vision is None:
            raise ValueError("this model has no vision embedder")
        return audio, cells, cpos

    # --- device forward ---

    def embed(self, p: Packed) -> torch.Tensor:
        return self.embed_ids(p.input_ids, p.audio, p.cells, p.cell_positions)

    def embed_ids(
        self,
        ids: torch.Tensor,
        audio: torch.Tensor | None,
        cells: torch.Tensor | None,
        cell_positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, H), placeholders filled in row-major order with media."""
        tk = self.cfg.tokens
        img = (ids == tk.image) | (ids == tk.video)
        aud = ids == tk.audio
        w = self.embed_tokens.weight
        scale = torch.tensor(self.cfg.text.hidden_size**0.5).to(w.dtype)
        x = F.embedding(torch.where(img | aud, torch.full_like(ids, tk.pad), ids), w) * scale
        if cells is not None and cell_positions is not None and self.vision is not None:
            x = _fill(x, img, self.vision(cells, cell_positions))
        if audio is not None and self.audio is not None:
            x = _fill(x, aud, self.audio(audio))
        return x

    def _kv_lengths(self, p: Packed, cache: KVCache) -> dict[bool | None, int]:
        """How much of each buffer kind (sliding, full, branch: None) this step reads."""
        longest = max(cache.length(s) for s in p.slot_list)
        out: dict[bool | None, int] = {}
        for sliding, cap in ((True, cache.sliding_capacity), (False, cache.full_capacity)):
            out[sliding] = cap + 1 if longest >= cap else _kv_bucket(longest, cap + 1)
        reads = [cache.branch_length(b) for b in p.branch_list if b is not None]
        # no branch row: two empty entries of the stand-in row (static steps read it)
        room = cache.spec.branch_room + 1
        out[None] = _kv_bucket(max(reads), room) if reads else min(2, room)
        return out

    def _masks(
        self, p: Packed, cache: KVCache | None, kv_len: dict[bool | None, int] | None = None
    ) -> dict[bool, torch.Tensor]:
        """Boolean masks (B, 1, T, K) per layer kind (key: sliding?)."""
        t = self.cfg.text
        q_pos = p.positions
        blocks = (
            block_ids(p.input_ids, self.cfg.tokens.image, self.cfg.tokens.video)
            if t.use_bidirectional_attention == "vision"
            else torch.full_like(p.input_ids, -1)
        )
        blocks = torch.where(p.valid, blocks, torch.full_like(blocks, -1))
        masks: dict[bool, torch.Tensor] = {}
        for sliding in (True, False):
            new_pos = torch.where(p.valid, q_pos, torch.full_like(q_pos, -1))
            if cache is not None:
                kv_len = kv_len if kv_len is not None else self._kv_lengths(p, cache)
                table = cache.pos_sliding if sliding else cache.pos_full
                past = _rows(table, p, kv_len[sliding], 1)
                if p.branches is not None:
                    bpos = cache.pos_branch.index_select(0, p.branches)[:, : kv_len[None]]
                    past = torch.cat([past, bpos], dim=1)
                kv_pos = torch.cat([past, new_pos], dim=1)
                kv_blocks = torch.cat([torch.full_like(past, -1), blocks], dim=1)
            else:
                kv_pos, kv_blocks = new_pos, blocks
            qp = q_pos.unsqueeze(-1)
            kp = kv_pos.unsqueeze(1)
            m = (kp >= 0) & (kp <= qp)
            if sliding:
                same = (kv_blocks.unsqueeze(1) == blocks.unsqueeze(-1)) & (
                    blocks.unsqueeze(-1) >= 0
                )
                m = (m | same) & (kp >= 0) & (kp > qp - t.sliding_window)
            masks[sliding] = m.unsqueeze(1)
        return masks

    def forward_packed(
        self, p: Packed, cache: KVCache | None = None, all_logits: bool = False
    ) -> torch.Tensor:
        """Run one ragged step; returns logits (B, V) at each row's last token, or (B, T, V)."""
        x = self.hidden_packed(p, cache)
        if not all_logits:
            x = x.gather(1, p.last.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., H) -> soft-capped fp32 logits (..., V)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return softcap(F.linear(x, w).float(), self.cfg.text.final_logit_softcapping)

    def hidden_packed(self, p: Packed, cache: KVCache | None = None) -> torch.Tensor:
        """Run one ragged step; returns the final-normed hidden states (B, T, H) of every token."""
        if cache is None:
            x, _ = self.run_layers(self.embed(p), p.positions, self._masks(p, None), None)
            return self.norm(x)
        kv = self._kv_lengths(p, cache)
        x = self.cached_step(p, cache, kv[True], kv[False], kv[None])
        self.advance(p, cache)
        return x

    def cached_step(
        self, p: Packed, cache: KVCache, kv_sliding: int, kv_full: int, kv_branch: int
    ) -> torch.Tensor:
        """The whole device part of a cached step, as one function of tensors and sizes.

        Embedding, masks, write indices, the cached K/V read, the layers, the K/V and
        position writes, the final norm: it reads no host bookkeeping (lengths and
        slot lists stay outside; ``kv_*`` are the entries read per buffer kind), so
        ``torch.compile`` can take the step whole (``rawcast.transports.runtime``).
        ``hidden_packed`` advances the lengths.
        """
        plan = self.plan(p, cache, {True: kv_sliding, False: kv_full, None: kv_branch})
        x, new = self.run_layers(
            self.embed(p), p.positions, plan.masks, self.gather_past(p, cache, plan)
        )
        self.write_kv(p, cache, plan, new)
        return self.norm(x)

    def plan(
        self, p: Packed, cache: KVCache, kv_len: dict[bool | None, int] | None = None
    ) -> StepPlan:
        """Bookkeeping of a cached step: what to read, masks, where to write."""
        t = self.cfg.text
        assert p.is_branch is not None and p.bases is not None
        kv_len = kv_len if kv_len is not None else self._kv_lengths(p, cache)
        write_idx: dict[bool, torch.Tensor] = {}
        branch_idx: torch.Tensor | None = None
        last_pos = p.positions.gather(1, p.last.view(-1, 1))
        main_row = (~p.is_branch).view(-1, 1)
        for sliding in (True, False):
            ref = t.sliding_layers[0] if sliding and t.sliding_layers else t.full_layers[0]
            keep = p.valid & main_row & (p.positions > last_pos - cache.capacity(ref))
            write_idx[sliding] = cache.write_index(ref, p.positions, keep)
        if p.branches is not None:
            room = cache.spec.branch_room
            offs = p.positions - p.bases.view(-1, 1)
            keep_b = p.valid & ~main_row & (offs < room)
            branch_idx = torch.where(keep_b, offs, torch.full_like(offs, room))
        return StepPlan(kv_len, self._masks(p, cache, kv_len), write_idx, branch_idx)

    def gather_past(
        self, p: Packed, cache: KVCache, plan: StepPlan
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cached K and V (B, Hkv, K, D) the step's rows attend to."""
        past = []
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            n = plan.kv_len[layer.sliding]
            ks, vs = [_rows(cache.k[i], p, n, 2)], [_rows(cache.v[i], p, n, 2)]
            if p.branches is not None:
                nb = plan.kv_len[None]
                ks.append(cache.kb[i].index_select(0, p.branches)[:, :, :nb])
                vs.append(cache.vb[i].index_select(0, p.branches)[:, :, :nb])
            past.append((ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, 2), torch.cat(vs, 2)))
        return past

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[bool, torch.Tensor],
        past: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The decoder stack over embedded tokens x (B, T, H) given each layer's cached K/V.

        Pure tensor code (no cache object): the ONNX export runs exactly this. Returns
        the residual stream before the final norm and each layer's new K and V.
        """
        rope = {
            True: rope_cos_sin(positions, self.inv_freq_sliding, x.dtype),
            False: rope_cos_sin(positions, self.inv_freq_full, x.dtype),
        }
        new: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            sliding = layer.sliding
            h = layer.input_layernorm(x)
            q, k, v = layer.self_attn.project(h, *rope[sliding])
            if past is not None:
                pk, pv = past[i]
                # new K/V are rounded to the cache's dtype first, as later steps read them
                kk = torch.cat([pk, k.to(pk.dtype)], dim=2).to(q.dtype)
                vv = torch.cat([pv, v.to(pv.dtype)], dim=2).to(q.dtype)
            else:
                kk, vv = k, v
            if q.shape[1] != kk.shape[1] and torch.onnx.is_in_onnx_export():
                rep = q.shape[1] // kk.shape[1]
                kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
            attn = F.scaled_dot_product_attention(
                q,
                kk,
                vv,
                attn_mask=masks[sliding],
                scale=1.0,
                enable_gqa=q.shape[1] != kk.shape[1],
            )
            b, _, tt, _ = attn.shape
            attn = layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, tt, -1))
            new.append((k, v))
            x = x + layer.post_attention_layernorm(attn)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            x = x * layer.layer_scalar
        return x, new

    def write_kv(
        self,
        p: Packed,
        cache: KVCache,
        plan: StepPlan,
        new: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """The step's new K/V and their positions into the cache buffers (device only;
        ``advance`` then grows the host lengths)."""
        for i, (k, v) in enumerate(new):
            idx = plan.write_idx[self.cfg.text.is_sliding(i)]
            cache.write(i, p.slots, idx, k, v)
            if p.branches is not None and plan.branch_idx is not None:
                cache.write(i, p.branches, plan.branch_idx, k, v, branch=True)
        self._commit_positions(p, cache, plan.write_idx, plan.branch_idx)

    def cached_kv(
        self, p: Packed, cache: KVCache, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the rows of ``p`` can attend to at ``layer`` before their own tokens are added.

        K and V (B, Hkv, K, D) and their absolute positions (B, K), -1 where empty: the
        slot's buffer, followed by the branch buffer on branch rows. The MTP drafter reads
        the target's last sliding and last full layer through this.
        """
        kv_len = self._kv_lengths(p, cache)
        sliding = self.cfg.text.is_sliding(layer)
        n = kv_len[sliding]
        ks, vs = [_rows(cache.k[layer], p, n, 2)], [_rows(cache.v[layer], p, n, 2)]
        pos = [_rows(cache.pos_table(layer), p, n, 1)]
        if p.branches is not None:
            nb = kv_len[None]
            ks.append(cache.kb[layer].index_select(0, p.branches)[:, :, :nb])
            vs.append(cache.vb[layer].index_select(0, p.branches)[:, :, :nb])
            pos.append(cache.pos_branch.index_select(0, p.branches)[:, :nb])
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(pos, dim=1)

    def _commit_positions(
        self,
        p: Packed,
        cache: KVCache,
        write_idx: dict[bool, torch.Tensor],
        branch_idx: torch.Tensor | None,
    ) -> None:
        b, tt = p.positions.shape
        si = p.slots.view(b, 1).expand(b, tt)
        for sliding, table in ((True, cache.pos_sliding), (False, cache.pos_full)):
            table.index_put_((si, write_idx[sliding]), p.positions)
            table[:, -1] = -1  # the trash column holds nothing
        if p.branches is not None and branch_idx is not None:
            bi = p.branches.view(b, 1).expand(b, tt)
            cache.pos_branch.index_put_((bi, branch_idx), p.positions)
            cache.pos_branch[:, -1] = -1
            cache.pos_branch[-1] = -1  # the stand-in row stays empty

    def advance(self, p: Packed, cache: KVCache) -> None:
        """After ``write_kv``: the host lengths grow by each row's real tokens."""
        for slot, br, n in zip(p.slot_list, p.branch_list, p.lengths, strict=True):
            if br is None:
                cache.advance(slot, n)
            else:
                cache.branch_lengths[br] += n

    # --- public API ---

    @torch.inference_mode()
    def step(
        self, rows: Sequence[Append], cache: KVCache, all_logits: bool = False
    ) -> torch.Tensor:
        """Append each row to its slot's cache in ONE forward; logits at each row's last token."""
        return self.forward_packed(self.pack(rows, cache), cache, all_logits=all_logits)

    @torch.inference_mode()
    def step_hidden(self, rows: Sequence[Append], cache: KVCache) -> torch.Tensor:
        """Like ``step``, but the final-normed hidden states (B, T, H) of every token.

        T is the padded width: row i's tokens are its first ``len(rows[i].tokens)`` entries.

        ``head`` turns any of them into logits: the engine takes each row's last one,
        speculative decoding all of a verify row's (see ``speculative.py``).
        """
        return self.hidden_packed(self.pack(rows, cache), cache)

    @torch.inference_mode()
    def logits(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        audio: torch.Tensor | None = None,
        images: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> torch.Tensor:
        """One-pass reference: logits (T, V) for ONE prompt, placeholders filled in order."""
        row = Append(slot=0, tokens=input_ids, audio=audio, images=list(images))
        p = self.pack([row], cache=None, pad_to=len(torch.as_tensor(input_ids).reshape(-1)))
        return self.forward_packed(p, None, all_logits=True)[0]
