"""The loop stop: a greedy decode that repeats a block stops there and keeps one copy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from tiny_model import tiny_model

from rawcast.model.cache import KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.loops import LoopRule, loop_cut
from rawcast.model.recipe import decode
from rawcast.pipeline.engine import EngineCore
from rawcast.pipeline.media import TextEvent
from rawcast.pipeline.session import SessionConfig, Tasks


def test_a_repeated_block_at_the_end_is_cut_to_its_first_copy() -> None:
    assert loop_cut([5, 6] + [7] * 12) == 3  # "x y t t t t ..." keeps "x y t"
    assert loop_cut([1, 2, 3] * 4) == 3
    assert loop_cut([9] + [1, 2, 3] * 4) == 4
    # a block of 2 needs six copies to cover min_span 12 tokens
    assert loop_cut([1, 2] * 5) is None
    assert loop_cut([1, 2] * 6) == 2
    # the loop must reach the end: text after it means the decode left it
    assert loop_cut([1, 2, 3] * 4 + [8]) is None


def test_ordinary_repetition_is_not_a_loop() -> None:
    # "no no no" and a repeated phrase said twice or three times are speech, not loops
    assert loop_cut([4, 4, 4]) is None
    assert loop_cut([1, 2, 3, 4] * 3) is None
    assert loop_cut(list(range(40))) is None
    assert loop_cut([]) is None


def test_the_rule_is_checked() -> None:
    with pytest.raises(ValueError, match="min_repeats"):
        LoopRule(min_repeats=1)
    with pytest.raises(ValueError, match="max_period"):
        LoopRule(max_period=0)
    # a block longer than max_period is not looked for
    assert loop_cut(list(range(10)) * 4, LoopRule(max_period=8)) is None
    assert loop_cut(list(range(10)) * 4, LoopRule(max_period=10)) == 10


def _cycle_model(model: Gemma4Unified, block: Sequence[int]) -> None:
    """Make ``model`` greedily emit ``block`` over and over after any branch prompt: each
    row's next token is the one after its last token in the cycle (the first after any
    other). The forward still runs; only the returned logits are steered."""
    real_step = model.step

    def step(rows: Sequence[Append], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        logits = real_step(rows, cache, all_logits)
        out = logits.clone()
        for i, row in enumerate(rows):
            last = row.tokens[-1] if row.tokens else -1
            nxt = block[(block.index(last) + 1) % len(block)] if last in block else block[0]
            out[i, nxt] = out[i].max() + 10.0
        return out

    model.step = step  # type: ignore[method-assign]


@pytest.fixture()
def looping() -> Gemma4Unified:
    model = tiny_model()
    assert model.tokenizer is not None
    _cycle_model(model, model.tokenizer.encode(" red ball"))
    return model


def _final_text(model: Gemma4Unified, rule: LoopRule | None) -> tuple[str, int]:
    core = EngineCore(model)
    cfg = SessionConfig(tasks=Tasks(transcribe=True), vad=None, max_new_tokens=40, loop_rule=rule)
    s = core.open(cfg)
    s.push_audio(0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32), 16000)
    s.flush()
    ticks = 0
    while core.has_work():
        ticks += 1 if core.step() else 0
    finals = [e.text for e in s.outbox if isinstance(e, TextEvent) and e.final]
    assert len(finals) == 1
    return finals[0], ticks


def test_the_engine_stops_a_looping_decode(looping: Gemma4Unified) -> None:
    """A stream whose decode loops gets one copy of the block as its text, and the engine
    stops decoding it instead of spending the whole token budget."""
    assert looping.tokenizer is not None
    block = looping.tokenizer.encode(" red ball")
    assert 1 <= len(block) <= 8
    text, ticks = _final_text(looping, LoopRule())
    plain, plain_ticks = _final_text(looping, None)
    assert text == "red ball"
    assert plain.startswith("red ball red ball red ball") and len(plain.split()) > 12
    assert ticks < plain_ticks


def test_offline_greedy_stops_at_the_same_point(looping: Gemma4Unified) -> None:
    """decode.greedy (rawcast eval, the parity tests) applies the same rule, and what it
    keeps is a prefix of plain greedy output."""
    audio = 0.1 * np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    cut = decode.greedy(looping, "transcribe", audio=audio)
    plain = decode.greedy(looping, "transcribe", audio=audio, loop_rule=None)
    assert looping.tokenizer is not None
    assert looping.tokenizer.decode(cut).strip() == "red ball"
    assert plain[: len(cut)] == cut and len(plain) == 48
