"""Guided alignment: a training-only loss that points decoder attention at the audio.

Design decisions:

- The problem it attacks: the shipped rawcast-tiny writes fluent sentences of its
  training language that share few words with the audio ("he finds my cold box" ->
  "he buys the red ball"), and transcribes its own training clips no better than
  held-out ones. Its CTC head shows the audio positions do carry phones; what the
  decoder lacks is *where to look*: each transcript token must find the frames of
  its word by content alone, which a four-layer model learns slowly, if ever.
- The loss (guided attention, as in Tachibana et al. 2018 for TTS, here for
  recognition): at the position that predicts transcript token j, the first
  ``heads`` query heads of the chosen layers are asked to put their attention mass
  on the frames of the word token j belongs to, ``-log(mass in the window)``,
  averaged over tokens and heads. The other heads stay free (language context).
- Word spans come from the data's word end times (estimated from the clean clip by
  character count, then carried through the augmentation), so they are rough: each
  window is widened by ``margin`` frames and a quarter of the word's length on both
  sides. The first word starts where a word of its length before the second ends.
- Nothing of it is exported: the inference graph, the checkpoint and the engine are
  unchanged. Translation and captions get no alignment (Spanish word order differs
  from the audio's; a caption has no audio).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

FRAME = 640
Encode = Callable[[str], Sequence[int]]


def word_spans(words: Sequence[str], ends: Sequence[int]) -> list[tuple[int, int]]:
    """Sample span (start, end) of each word from its end times (len(ends) >= words)."""
    spans: list[tuple[int, int]] = []
    for k in range(len(words)):
        end = int(ends[k])
        if k > 0:
            start = int(ends[k - 1])
        elif len(words) > 1:
            per_char = (int(ends[1]) - end) / max(1, len(words[1]))
            start = max(0, int(end - per_char * len(words[0])))
        else:
            start = 0
        spans.append((start, max(end, start + 1)))
    return spans


def token_words(encode: Encode, words: Sequence[str]) -> list[int]:
    """The word index of each token of ``" ".join(words)``; [] when the tokenization of
    the whole is not the concatenation of its words' (then the example gets no loss)."""
    out: list[int] = []
    n = 0
    for k in range(len(words)):
        m = len(encode(" ".join(words[: k + 1])))
        if m < n:
            return []
        out.extend([k] * (m - n))
        n = m
    return out


def frame_windows(
    spans: Sequence[tuple[int, int]], n_frames: int, margin: int = 3
) -> list[tuple[int, int]]:
    """Frame window [lo, hi) of each word: its span widened by ``margin`` frames and a
    quarter of its length on each side, clipped to the clip."""
    out = []
    for s, e in spans:
        lo_f, hi_f = s / FRAME, e / FRAME
        pad = margin + 0.25 * (hi_f - lo_f)
        lo = max(0, int(lo_f - pad))
        hi = min(n_frames, int(hi_f + pad) + 1)
        out.append((lo, max(hi, lo + 1)))
    return out


def token_windows(
    encode: Encode, text: str, ends: Sequence[int], n_frames: int
) -> list[tuple[int, int]]:
    """Frame window of each token of ``text`` (as ``encode`` makes them), or []."""
    words = text.split()
    if not words or len(ends) < len(words):
        return []
    owner = token_words(encode, words)
    if not owner:
        return []
    wins = frame_windows(word_spans(words, ends), n_frames)
    return [wins[k] for k in owner]


@dataclass
class Targets:
    """Where the loss applies in a packed batch.

    ``rows`` (B, T) marks the query positions with a window; ``window`` (B, T, K) the
    key positions each may attend to count as on target."""

    rows: torch.Tensor
    window: torch.Tensor

    @staticmethod
    def build(
        width: int,
        examples: Mapping[int, tuple[int, int, Sequence[tuple[int, int]]]],
        batch: int,
        device: torch.device,
        gaps: Mapping[int, tuple[int, int]] | None = None,
    ) -> Targets | None:
        """``examples``: row -> (first query position, position of the first frame,
        frame windows); query position ``first + j`` predicts token j of the target.
        ``gaps``: row -> (frame, length) where ``length`` other positions (a camera
        frame's image block) sit before that frame: later frames move by ``length`` and
        the gap is never on target. None when no row has a window."""
        rows = torch.zeros(batch, width, dtype=torch.bool)
        window = torch.zeros(batch, width, width, dtype=torch.bool)
        for b, (first, offset, wins) in examples.items():
            at, length = (gaps or {}).get(b, (width, 0))
            for j, (lo, hi) in enumerate(wins):
                q = first + j
                rows[b, q] = True
                if lo < at:
                    window[b, q, offset + lo : offset + min(hi, at)] = True
                if hi > at:
                    window[b, q, offset + length + max(lo, at) : offset + length + hi] = True
        if not bool(rows.any()):
            return None
        return Targets(rows.to(device), window.to(device))


def uniform_loss(mask: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``loss`` under uniform attention over the visible keys: -log of the window's share
    of them, the baseline a guided head starts from (a head that ignores the audio does
    worse)."""
    b, _, t, k = mask.shape
    return loss(
        mask.new_zeros(b, 1, t, 1, dtype=torch.float32),
        mask.new_zeros(b, 1, k, 1, dtype=torch.float32),
        mask,
        targets,
        1,
    )


def loss(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, targets: Targets, heads: int
) -> torch.Tensor:
    """Mean ``-log`` attention mass inside the window, over the marked query positions
    and the first ``heads`` query heads. ``q`` (B, Hq, T, D), ``k`` (B, Hk, K, D) as the
    layer attends (normed and rotated, scale 1), ``mask`` (B, 1, T, K) boolean."""
    hq, hk = q.shape[1], k.shape[1]
    heads = min(heads, hq)
    kv = k.repeat_interleave(hq // hk, dim=1)[:, :heads]
    scores = q[:, :heads].float() @ kv.float().transpose(-1, -2)
    scores = scores.masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)  # (B, h, T, K)
    inside = logp.masked_fill(~(targets.window & mask[:, 0]).unsqueeze(1), float("-inf"))
    mass = torch.logsumexp(inside, dim=-1)  # (B, h, T)
    sel = targets.rows.unsqueeze(1).expand_as(mass)
    vals = mass[sel]
    vals = vals[torch.isfinite(vals)]  # a window wholly outside a sliding layer's reach
    if vals.numel() == 0:
        return q.new_zeros(())
    return -vals.mean()
