"""Speculative decoding inside the engine's branches: with a drafter the engine emits
exactly the events it emits without one, still in ONE backbone forward per tick, in
fewer ticks when the drafts are good; failures stay isolated per session.

Drafters: a random tiny MTP drafter built by transformers (acceptance near zero: every
round is mostly a correction), and a cheating one that drafts the target's own greedy
continuation with some tokens corrupted (long accepted runs, partial acceptance and
rollbacks). Everything runs in fp32 (exactness holds up to reduction order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from drafter_helpers import make_hf_drafter
from tiny_model import fixture_pcm, tiny_model

from rawcast.model import drafter as dr
from rawcast.model.cache import KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.speculative import Proposer, SpecConfig
from rawcast.pipeline.engine import EngineConfig, EngineCore
from rawcast.pipeline.media import ClosedEvent, ErrorEvent, Event, TextEvent
from rawcast.pipeline.session import Session, SessionConfig, Tasks


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> Gemma4Unified:
    return tiny_model()


@pytest.fixture(scope="module")
def mtp(model: Gemma4Unified, tmp_path_factory: pytest.TempPathFactory) -> dr.Drafter:
    """A random transformers drafter shaped for the engine's tiny target."""
    path = tmp_path_factory.mktemp("mtp")
    t = model.cfg.text
    make_hf_drafter(path, text_overrides={"vocab_size": t.vocab_size, "sliding_window": 32})
    return dr.load(path, target=model)


class Cheat:
    """Drafts the target's own greedy continuation (plain one-token steps in the branch
    buffer, rolled back afterwards), each token corrupted with probability ``p``."""

    def __init__(self, target: Gemma4Unified, p: float, seed: int = 0) -> None:
        self.step = target.step  # bound now: tests may count calls of ``model.step``
        self.p = p
        self.g = torch.Generator().manual_seed(seed)

    def propose(
        self,
        target: Gemma4Unified,
        cache: KVCache,
        rows: Sequence[Append],
        hidden: torch.Tensor,
        k: int,
        suppress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert all(r.branch is not None for r in rows)
        marks = [cache.branch_length(r.branch) for r in rows if r.branch is not None]
        cur = list(rows)
        out = []
        for _ in range(k):
            logits = self.step(cur, cache)
            if suppress is not None:
                logits = logits.index_fill(-1, suppress, float("-inf"))
            toks = logits.argmax(-1)
            out.append(toks)
            cur = [
                Append(r.slot, [int(t)], branch=r.branch) for r, t in zip(rows, toks, strict=True)
            ]
        for r, m in zip(rows, marks, strict=True):
            assert r.branch is not None
            cache.rollback_branch(r.branch, m)
        drafts = torch.stack(out, 1)
        wrong = torch.rand(drafts.shape, generator=self.g) < self.p
        noise = torch.randint(3, 300, drafts.shape, generator=self.g)
        return torch.where(wrong, noise, drafts)


IMAGE = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
CONFIGS = [
    SessionConfig(
        tasks=Tasks(transcribe=True, translate="Spanish"), vad=None, max_new_tokens=16,
        max_soft_tokens=70,
    ),
    SessionConfig(
        tasks=Tasks(transcribe=True, caption=True), vad=None, max_new_tokens=12,
        decode_interval_ms=800, max_soft_tokens=70,
    ),
    SessionConfig(
        tasks=Tasks(transcribe=False, translate="French"), vad=None, max_new_tokens=20,
        max_soft_tokens=70,
    ),
]  # fmt: skip
ENGINE = EngineConfig(max_sessions=4, max_image_tokens=70)


def run(
    model: Gemma4Unified,
    drafter: Proposer | None,
    spec: SpecConfig | None = None,
    before_tick: Callable[[EngineCore], None] | None = None,
) -> tuple[EngineCore, list[Session]]:
    """Three sessions (audio tasks, a caption with an image) fed the fixture, to the end."""
    core = EngineCore(model, ENGINE, drafter=drafter, spec=spec)
    pcm = fixture_pcm()
    sessions = [core.open(c) for c in CONFIGS]
    sessions[1].push_image(IMAGE, 0.0)
    for i, s in enumerate(sessions):
        s.push_audio(pcm[: pcm.size - 4000 * i], 16000)
        s.flush()
    while core.has_work():
        if before_tick is not None:
            before_tick(core)
        core.step()
    return core, sessions


def texts(events: list[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, TextEvent)]


@pytest.fixture(scope="module")
def plain(model: Gemma4Unified) -> tuple[EngineCore, list[list[Event]]]:
    core, sessions = run(model, None)
    return core, [s.outbox for s in sessions]


def test_events_equal_plain_decoding(
    model: Gemma4Unified, mtp: dr.Drafter, plain: tuple[EngineCore, list[list[Event]]]
) -> None:
    """Final texts, partial deltas and their media times are exactly the plain engine's,
    with the random drafter and with the cheating one (here in fewer ticks)."""
    base, want = plain
    assert all(texts(w) for w in want)
    assert {e.task for w in want for e in texts(w)} == {"transcribe", "translate", "caption"}
    assert base.draft_calls == 0
    for drafter, spec in (
        (mtp, SpecConfig()),
        (Cheat(model, 0.15), SpecConfig(k=2, k_min=1, k_max=6)),
        (Cheat(model, 0.0), SpecConfig(k=8, k_max=8)),
    ):
        core, sessions = run(model, drafter, spec)
        assert [s.outbox for s in sessions] == want
        assert core.draft_calls > 0 and core.drafted > 0
        if isinstance(drafter, Cheat):
            assert core.acceptance > 0.6
            assert core.ticks < base.ticks  # several tokens per tick: the point of it all
        assert not core._streams  # every stream ended with its branch


def test_partial_deltas_equal_with_the_bundled_model() -> None:
    """With the trained rawcast-tiny (real text, so the partial decodes agree and emit
    deltas), a session's events are exactly the plain engine's (skipped if not bundled)."""
    from rawcast.model.loader import BUNDLED_DIR, load

    if not (BUNDLED_DIR / "rawcast-tiny" / "config.json").exists():
        pytest.skip("rawcast-tiny is not bundled in this checkout")
    trained = load("rawcast-tiny")
    cfg = SessionConfig(
        tasks=Tasks(transcribe=True, translate="Spanish"), vad=None, decode_interval_ms=960
    )
    pcm = fixture_pcm()
    outs = []
    for drafter in (None, Cheat(trained, 0.15)):
        spec = SpecConfig(k=3, k_max=4)
        core = EngineCore(trained, EngineConfig(max_sessions=1), drafter=drafter, spec=spec)
        s = core.open(cfg)
        for i in range(0, pcm.size, 8000):
            s.push_audio(pcm[i : i + 8000], 16000)
            core.step()
        s.flush()
        core.run_until_idle()
        outs.append((s.outbox, core.ticks, core.acceptance))
    (want, ticks, _), (got, spec_ticks, acceptance) = outs
    assert sum(1 for e in want if isinstance(e, TextEvent) and not e.final and e.text) >= 2
    assert got == want
    assert acceptance > 0.6 and spec_ticks < ticks


def test_one_backbone_forward_per_tick(model: Gemma4Unified) -> None:
    """Each tick runs ONE ``step_hidden`` (verify rows, prompts and media appends
    together) and no ``step``; the drafter's calls are counted apart, at most one per tick."""
    cheat = Cheat(model, 0.2)  # its own target steps are bound before the patch
    seen: dict[str, list[int]] = {"step": [], "step_hidden": []}  # the tick of each call
    holder: list[EngineCore] = []
    real = {name: getattr(model, name) for name in seen}

    def counting(name: str) -> Callable[..., Any]:
        def f(*a: Any, **k: Any) -> Any:
            seen[name].append(holder[0].ticks)
            return real[name](*a, **k)

        return f

    for name in seen:
        setattr(model, name, counting(name))
    try:
        core, _ = run(
            model, cheat, SpecConfig(k=3), before_tick=lambda c: holder[:1] or holder.append(c)
        )
    finally:
        for name in seen:
            delattr(model, name)
    assert not seen["step"]
    ticks = seen["step_hidden"]
    assert len(ticks) == len(set(ticks)) == core.ticks == core.forwards > 0
    assert 0 < core.draft_calls <= core.ticks


def test_a_failing_session_does_not_disturb_others(
    model: Gemma4Unified, plain: tuple[EngineCore, list[list[Event]]]
) -> None:
    """A session whose rows break the forward mid-decode (a verify row of its slot) ends
    with an error; the tick is retried per session and the others' events are unchanged."""
    _, want = plain
    real = model.step_hidden
    bad_slot = 2

    def flaky(rows: Sequence[Append], cache: KVCache) -> torch.Tensor:
        if any(r.slot == bad_slot and len(r.tokens) > 1 and r.branch is not None for r in rows):
            raise RuntimeError("boom")
        return real(rows, cache)

    model.step_hidden = flaky  # type: ignore[method-assign]
    try:
        core, sessions = run(model, Cheat(model, 0.1), SpecConfig(k=3))
    finally:
        del model.step_hidden
    bad = sessions[bad_slot]
    assert any(isinstance(e, ErrorEvent) and e.fatal and "boom" in e.message for e in bad.outbox)
    assert isinstance(bad.outbox[-1], ClosedEvent)
    assert bad.id not in core.sessions
    assert [s.outbox for s in sessions[:bad_slot]] == want[:bad_slot]


def test_configuration_errors(model: Gemma4Unified, mtp: dr.Drafter) -> None:
    """Too small a branch room and a backend without step_hidden fail at construction;
    a session asking for more tokens than the room holds is refused at open."""
    with pytest.raises(ValueError, match="branch_room 40 is too small for speculative"):
        EngineCore(model, EngineConfig(branch_room=40), drafter=mtp)

    class Backend:
        def step(self, rows: Sequence[Append], cache: KVCache) -> torch.Tensor:
            return model.step(rows, cache)

    with pytest.raises(ValueError, match="needs the torch backend"):
        EngineCore(model, backend=Backend(), drafter=mtp)
    core = EngineCore(model, EngineConfig(branch_room=96), drafter=mtp)
    with pytest.raises(ValueError, match="max_new_tokens 100"):
        core.open(SessionConfig(vad=None, max_new_tokens=100))
    EngineCore(model, EngineConfig(branch_room=40))  # no drafter: no requirement


def test_a_drafter_that_does_not_fit_is_refused(
    model: Gemma4Unified, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """By the loader, and by ``rawcast serve --drafter`` (one line, exit 2, before the
    server starts): the tiny drafter does not fit the bundled model."""
    from rawcast.transports.cli import main

    make_hf_drafter(tmp_path, text_overrides={"vocab_size": 300, "sliding_window": 32})
    with pytest.raises(dr.CheckpointError, match="does not fit the target"):
        dr.load(tmp_path, target=model)
    capsys.readouterr()
    assert main(["serve", "--model", "rawcast-tiny", "--drafter", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the model" in err[0], err
    argv = ["serve", "--backend", "onnx", "--drafter", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--drafter needs --backend torch" in err[0], err


def test_the_bundled_drafter_drafts_for_the_bundled_model() -> None:
    """The shipped rawcast-tiny-drafter (``rawcast train --drafter``) fits the shipped
    model, transformers loads it, and in the engine its drafts are accepted (on the
    fixture, phase 11 with its drafter: 18 %; 36 % over 30 held-out clips) where the
    same drafter with random weights gets none kept, while the text stays exactly plain
    greedy's."""
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from rawcast.model.loader import BUNDLED_DIR, load, resolve
    from rawcast.model.recipe.drafter_train import init_drafter

    if not (BUNDLED_DIR / "rawcast-tiny-drafter" / "config.json").exists():
        pytest.skip("rawcast-tiny-drafter is not bundled in this checkout")
    trained = load("rawcast-tiny")
    shipped = dr.load("rawcast-tiny-drafter", target=trained)
    hf = Gemma4UnifiedAssistantForCausalLM.from_pretrained(resolve("rawcast-tiny-drafter"))
    assert hf.config.backbone_hidden_size == trained.cfg.text.hidden_size
    cfg = SessionConfig(tasks=Tasks(transcribe=True, translate="Spanish"), vad=None)
    scrambled = dr.load("rawcast-tiny-drafter", target=trained)
    init_drafter(scrambled, seed=0)
    outs = []
    for drafter in (None, shipped, scrambled):
        core = EngineCore(trained, EngineConfig(max_sessions=1), drafter=drafter)
        s = core.open(cfg)
        s.push_audio(fixture_pcm(), 16000)
        s.flush()
        core.run_until_idle()
        outs.append((texts(s.outbox), core.acceptance, core.drafted))
    (want, _, _), (got, acceptance, drafted), (got_random, random_acceptance, _) = outs
    assert got == want == got_random and any(e.text for e in want if isinstance(e, TextEvent))
    assert random_acceptance < 0.05, random_acceptance
    assert drafted > 0 and acceptance > 0.15, (acceptance, random_acceptance)


def test_verify_rows_count_against_the_tick_token_budget(model: Gemma4Unified) -> None:
    """``max_tokens_per_tick`` bounds a tick's forward with a drafter too: a decode row
    is charged as the verify row it may become (1 + k_max tokens), so once one session
    has filled the budget no other session's rows join the forward (before, decode rows
    were charged one token and four sessions' verify rows could share a tick)."""
    budget = 3
    totals: list[tuple[int, int]] = []  # (all tokens, the largest single slot's tokens)
    real = model.step_hidden

    def spy(rows: Sequence[Append], cache: KVCache) -> torch.Tensor:
        per_slot: dict[int, int] = {}
        for r in rows:
            per_slot[r.slot] = per_slot.get(r.slot, 0) + len(r.tokens)
        totals.append((sum(per_slot.values()), max(per_slot.values())))
        return real(rows, cache)

    model.step_hidden = spy  # type: ignore[method-assign]
    try:
        core = EngineCore(
            model,
            EngineConfig(max_sessions=4, max_tokens_per_tick=budget),
            drafter=Cheat(model, 0.1),
            spec=SpecConfig(k=3, k_max=4),
        )
        cfg = SessionConfig(tasks=Tasks(transcribe=True, translate="Spanish"), vad=None)
        pcm = fixture_pcm()[:16000]
        sessions = [core.open(cfg) for _ in range(4)]
        for s in sessions:
            s.push_audio(pcm, 16000)
            s.flush()
        core.run_until_idle()
    finally:
        del model.step_hidden
    assert core.drafted > 0 and any(s.outbox for s in sessions)
    # every session but the last one admitted stays under the budget
    assert all(total - largest < budget for total, largest in totals), totals
