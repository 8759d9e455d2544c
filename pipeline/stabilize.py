"""Stabilising partial hypotheses: local agreement of consecutive decodes.

A word is committed once two consecutive hypotheses of the same segment agree on
it and on every word before it (LocalAgreement-2, as in whisper-streaming).
Committed words are never retracted by partial events; the segment's final text
is the final decode, which clients use to replace the partials.
"""

from __future__ import annotations


class LocalAgreement:
    def __init__(self) -> None:
        self.committed: list[str] = []
        self._previous: list[str] | None = None

    def reset(self) -> None:
        self.committed = []
        self._previous = None

    @property
    def text(self) -> str:
        return " ".join(self.committed)

    def update(self, hypothesis: str) -> str:
        """Feed one partial hypothesis; return the newly committed text ('' if none)."""
        words = hypothesis.split()
        prev, self._previous = self._previous, words
        if prev is None:
            return ""
        agree = 0
        for a, b in zip(prev, words, strict=False):
            if a != b:
                break
            agree += 1
        n = len(self.committed)
        if agree <= n or words[:n] != self.committed:
            return ""
        new = words[n:agree]
        self.committed.extend(new)
        return " ".join(new)
