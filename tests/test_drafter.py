"""The MTP drafter and speculative greedy decoding.

Parity: a tiny random target and drafter built and saved by transformers, loaded by
rawcast; rawcast's proposals (and the drafter's logits) equal transformers'
``SinglePositionMultiTokenCandidateGenerator`` for the same context. Exactness:
speculative decoding emits exactly the tokens of plain greedy decoding, over slots
and branch buffers, with a real (random) drafter and with a noisy oracle drafter
that makes long accepted runs, partial acceptance and rollbacks all happen.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from drafter_helpers import make_hf_drafter
from hf_reference import make_hf_model
from safetensors.torch import load_file, save_file

from rawcast.model import drafter as dr
from rawcast.model import loader
from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.config import ConfigError
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.loader import CheckpointError
from rawcast.model.speculative import SpecConfig, accept, begin, draft, generate, greedy

WINDOW = 16  # the tiny target's sliding window
K = 5
SUPPRESS = torch.tensor([0, 1, 2, *range(290, 297)])  # pad, eos, bos, media ids


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@dataclasses.dataclass
class Pair:
    hf_target: Any
    hf_drafter: Any
    target: Gemma4Unified
    drafter: dr.Drafter
    drafter_path: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("mtp")
    hf_target = make_hf_model(root / "target", seed=0)
    hf_drafter = make_hf_drafter(root / "drafter")
    target = loader.load(root / "target")
    return Pair(hf_target, hf_drafter, target, dr.load(root / "drafter", target=target), root)


def hf_proposals(
    hf_target: Any, hf_drafter: Any, ids: torch.Tensor, k: int
) -> tuple[int, list[int], torch.Tensor]:
    """transformers' first greedy token, its candidate generator's k drafts and logits."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import (
        SinglePositionMultiTokenCandidateGenerator,
    )

    gen = SinglePositionMultiTokenCandidateGenerator(
        hf_drafter, hf_target.get_input_embeddings(), GenerationConfig(max_length=10_000)
    )
    gen.num_assistant_tokens = k
    with torch.no_grad():
        out = hf_target(
            input_ids=ids.view(1, -1),
            output_hidden_states=True,
            return_shared_kv_states=True,
            use_cache=False,
        )
    t0 = int(out.logits[0, -1].argmax())
    full = torch.cat([ids, torch.tensor([t0])]).view(1, -1)
    cand, logits = gen.get_candidates(
        full,
        model_kwargs={"attention_mask": torch.ones_like(full)},
        model_outputs=out,
        is_first_iteration=False,
        n_last_matches=0,
    )
    return t0, cand[0, len(ids) + 1 :].tolist(), logits[0]


def rawcast_proposals(
    pair: Pair, cache: KVCache, rows: Sequence[Append], hidden: torch.Tensor, k: int
) -> tuple[list[int], list[list[int]], torch.Tensor]:
    """rawcast's first greedy tokens, proposals and drafter logits (B, k, V) for rows."""
    d = pair.drafter
    with torch.inference_mode():
        t0 = pair.target.head(hidden).argmax(-1).tolist()
    states: list[torch.Tensor] = []
    hook = d.norm.register_forward_hook(lambda _m, _i, o: states.append(o[:, 0]))
    try:
        rows1 = [Append(r.slot, [t], branch=r.branch) for r, t in zip(rows, t0, strict=True)]
        drafts = d.propose(pair.target, cache, rows1, hidden, k).tolist()
    finally:
        hook.remove()
    logits = torch.nn.functional.linear(torch.stack(states, 1), d.embed_tokens.weight)
    return t0, drafts, logits


def randint(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(3, 280, (n,), generator=g)


# --- (a) parity with transformers ---------------------------------------------------------


def test_proposals_match_transformers(pair: Pair) -> None:
    """Batched over slots, prompts shorter and longer than the window, chunked prefill
    and a rolled-back excursion: proposals and drafter logits equal transformers'."""
    g = torch.Generator().manual_seed(3)
    prompts = [randint(g, n) for n in (3, 9, WINDOW + 1, WINDOW + 2, 41)]
    cache = KVCache(pair.target.cfg.text, CacheSpec(slots=6, full_capacity=128, branch_room=24))
    slots = [5, 0, 2, 1, 3]  # not contiguous: the gather path
    halves = [len(p) // 2 or 1 for p in prompts]
    pair.target.step(
        [Append(s, p[:h]) for s, p, h in zip(slots, prompts, halves, strict=True)], cache
    )
    mark = cache.mark(3)
    pair.target.step([Append(3, randint(g, 20))], cache)  # reuses ring entries, then forgotten
    cache.rollback(3, mark)
    rows = [Append(s, p[h:]) for s, p, h in zip(slots, prompts, halves, strict=True)]
    with torch.inference_mode():
        hs = pair.target.step_hidden(rows, cache)
    last = torch.tensor([len(r.tokens) - 1 for r in rows])
    t0, drafts, logits = rawcast_proposals(pair, cache, rows, hs[torch.arange(len(rows)), last], K)
    for i, ids in enumerate(prompts):
        ref_t0, ref_drafts, ref_logits = hf_proposals(pair.hf_target, pair.hf_drafter, ids, K)
        assert t0[i] == ref_t0
        assert drafts[i] == ref_drafts, f"prompt of {len(ids)} tokens"
        torch.testing.assert_close(logits[i], ref_logits, atol=2e-5, rtol=1e-5)


def test_branch_proposals_match_transformers(pair: Pair) -> None:
    """Branch buffers over a shared slot prefix draft like the concatenated prompt."""
    g = torch.Generator().manual_seed(6)
    prefix = randint(g, 23)
    tails = [randint(g, 4), randint(g, 11)]
    spec = CacheSpec(slots=2, full_capacity=128, branch_room=24, branches=3)
    cache = KVCache(pair.target.cfg.text, spec)
    pair.target.step([Append(1, prefix)], cache)
    rows = [Append(1, t, branch=b) for t, b in zip(tails, (2, 0), strict=True)]
    with torch.inference_mode():
        hs = pair.target.step_hidden(rows, cache)
    h = hs[torch.arange(2), torch.tensor([len(t) - 1 for t in tails])]
    t0, drafts, logits = rawcast_proposals(pair, cache, rows, h, K)
    for i, tail in enumerate(tails):
        ref = hf_proposals(pair.hf_target, pair.hf_drafter, torch.cat([prefix, tail]), K)
        assert (t0[i], drafts[i]) == ref[:2]
        torch.testing.assert_close(logits[i], ref[2], atol=2e-5, rtol=1e-5)


def test_ordered_embeddings_match_transformers(pair: Pair, tmp_path: Path) -> None:
    """The centroid-masked head (use_ordered_embeddings) drafts the same tokens."""
    hf = make_hf_drafter(
        tmp_path,
        seed=7,
        use_ordered_embeddings=True,
        num_centroids=10,
        centroid_intermediate_top_k=3,
    )
    d = dr.load(tmp_path, target=pair.target)
    assert d.masked_embedding is not None
    g = torch.Generator().manual_seed(5)
    for n in (6, 30):
        ids = randint(g, n)
        cache = KVCache(pair.target.cfg.text, CacheSpec(slots=1, full_capacity=64, branch_room=8))
        with torch.inference_mode():
            h = pair.target.step_hidden([Append(0, ids)], cache)[:, n - 1]
            t0 = int(pair.target.head(h).argmax())
        mine = d.propose(pair.target, cache, [Append(0, [t0])], h, K)[0].tolist()
        assert (t0, mine) == hf_proposals(pair.hf_target, hf, ids, K)[:2]


# --- (b) speculative == plain greedy -------------------------------------------------------


class NoisyOracle:
    """Proposes the true greedy continuation with each token wrong with probability ``p``."""

    def __init__(self, refs: dict[tuple[int, int | None], tuple[int, list[int]]], p: float):
        self.refs = refs  # (slot, branch) -> (position of the first generated token, tokens)
        self.p = p
        self.g = torch.Generator().manual_seed(11)

    def propose(
        self,
        target: Gemma4Unified,
        cache: KVCache,
        rows: Sequence[Append],
        hidden: torch.Tensor,
        k: int,
        suppress: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = []
        for r in rows:
            start, toks = self.refs[(r.slot, r.branch)]
            pos = cache.length(r.slot) + (0 if r.branch is None else cache.branch_length(r.branch))
            j = pos - start  # index of the row's token in the reference
            assert toks[j] == int(torch.as_tensor(r.tokens)[0])
            row = []
            for i in range(k):
                true = toks[j + 1 + i] if j + 1 + i < len(toks) else 7
                wrong = float(torch.rand(1, generator=self.g)) < self.p
                row.append(int(torch.randint(3, 280, (1,), generator=self.g)) if wrong else true)
            out.append(row)
        return torch.tensor(out, dtype=torch.long).view(len(rows), k)


def fresh(pair: Pair, slots: int = 6, branches: int = 0) -> KVCache:
    spec = CacheSpec(slots=slots, full_capacity=256, branch_room=48, branches=branches)
    return KVCache(pair.target.cfg.text, spec)


def prompt_rows(g: torch.Generator, lengths: Sequence[int]) -> list[Append]:
    return [Append(i, randint(g, n)) for i, n in enumerate(lengths)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_equals_greedy(pair: Pair, k: int) -> None:
    """Many prompts (shorter and longer than the window) batched over slots, random and
    noisy-oracle drafters, with suppressed ids and a stop token: identical tokens."""
    g = torch.Generator().manual_seed(20 + k)
    lengths = [2, 7, WINDOW, WINDOW + 5, 33, 50]
    suppress = SUPPRESS
    rows = prompt_rows(g, lengths)
    ref = greedy(pair.target, fresh(pair), rows, 24, suppress=suppress)
    stop = {ref[0][9]}  # a token that stops at least one stream early
    ref_stop = greedy(pair.target, fresh(pair), rows, 24, stop=stop, suppress=suppress)
    cfg = SpecConfig(k=k, k_min=1, k_max=8)
    starts = {(r.slot, None): (len(r.tokens), ref[i]) for i, r in enumerate(rows)}
    total = 0
    for proposer, want, stops in (
        (pair.drafter, ref, set()),
        (NoisyOracle(starts, 0.25), ref, set()),
        (NoisyOracle(starts, 0.0), ref, set()),
        (NoisyOracle(starts, 0.25), ref_stop, stop),
    ):
        cache = fresh(pair)
        res = generate(pair.target, proposer, cache, rows, 24, cfg, stops, suppress)
        assert res.tokens == want
        assert [cache.length(r.slot) for r in rows] == [
            len(r.tokens) + len(t) - 1 for r, t in zip(rows, want, strict=True)
        ]
        total += res.accepted
    assert total > 24  # the oracles made long accepted runs happen


def oracle_for(
    cache: KVCache, rows: Sequence[Append], ref: list[list[int]], p: float
) -> NoisyOracle:
    """A noisy oracle for ``rows`` about to be decoded from ``cache`` (reference ``ref``)."""
    starts = {}
    for r, toks in zip(rows, ref, strict=True):
        base = cache.length(r.slot) + (0 if r.branch is None else cache.branch_length(r.branch))
        starts[(r.slot, r.branch)] = (base + len(r.tokens), toks)
    return NoisyOracle(starts, p)


Decode = Callable[[KVCache, Sequence[Append]], list[list[int]]]


def three_ways(pair: Pair, n: int, run: Callable[[Decode], Any]) -> None:
    """``run`` with plain greedy, the random drafter and a noisy oracle: same tokens."""
    t = pair.target

    def plain(c: KVCache, rows: Sequence[Append]) -> list[list[int]]:
        return greedy(t, c, rows, n, suppress=SUPPRESS)

    def spec(c: KVCache, rows: Sequence[Append]) -> list[list[int]]:
        return generate(t, pair.drafter, c, rows, n, SpecConfig(k=4), suppress=SUPPRESS).tokens

    want = run(plain)
    refs = iter(want)

    def oracle(c: KVCache, rows: Sequence[Append]) -> list[list[int]]:
        o = oracle_for(c, rows, next(refs), 0.3)
        return generate(t, o, c, rows, n, SpecConfig(k=3), suppress=SUPPRESS).tokens

    assert run(spec) == want
    assert run(oracle) == want


def test_state_after_rounds_equals_a_fresh_prefill(pair: Pair) -> None:
    """After verify rounds with partial acceptance and rollbacks, each stream's hidden state
    and the drafter's next proposals equal those of a cache prefilled with the same text."""
    g = torch.Generator().manual_seed(50)
    rows = prompt_rows(g, [4, 21, 40])
    t = pair.target
    ref = greedy(t, fresh(pair, 3), rows, 30, suppress=SUPPRESS)
    cache = fresh(pair, 3)
    oracle = oracle_for(cache, rows, ref, 0.3)
    streams = begin(t, cache, rows, SpecConfig(k=3), suppress=SUPPRESS)
    emitted = [[s.token] for s in streams]
    for _ in range(4):
        verify = draft(oracle, t, cache, streams, SUPPRESS)
        new = accept(t, cache, streams, verify, t.step_hidden(verify, cache), suppress=SUPPRESS)
        for out, toks in zip(emitted, new, strict=True):
            out.extend(toks)
        refill = fresh(pair, 3)
        context = [
            Append(r.slot, torch.cat([torch.as_tensor(r.tokens), torch.tensor(e[:-1])]))
            for r, e in zip(rows, emitted, strict=True)
        ]
        hs = t.step_hidden(context, refill)
        h = hs[torch.arange(3), torch.tensor([len(c.tokens) - 1 for c in context])]
        torch.testing.assert_close(torch.stack([s.hidden for s in streams]), h, atol=1e-5, rtol=0)
        nxt = [Append(s.slot, [s.token]) for s in streams]
        mine = pair.drafter.propose(t, cache, nxt, torch.stack([s.hidden for s in streams]), K)
        assert mine.tolist() == pair.drafter.propose(t, refill, nxt, h, K).tolist()
    assert sum(s.accepted for s in streams) > 0
    assert any(s.accepted < s.drafted for s in streams)


def test_verify_rows_share_the_forward_with_other_work(pair: Pair) -> None:
    """The engine's tick: branch verify rows and another slot's append in ONE forward."""
    g = torch.Generator().manual_seed(60)
    prefix, other = randint(g, 20), [randint(g, n) for n in (7, 5, 9)]
    tails = [randint(g, 3), randint(g, 6)]
    t = pair.target

    def fresh_with_prefix() -> KVCache:
        c = fresh(pair, 2, branches=2)
        t.step([Append(0, prefix), Append(1, other[0])], c)
        return c

    rows = [Append(0, tail, branch=b) for b, tail in enumerate(tails)]
    ref = greedy(t, fresh_with_prefix(), rows, 12, suppress=SUPPRESS)
    ref_other = fresh_with_prefix()
    for chunk in other[1:]:
        want_logits = t.step([Append(1, chunk)], ref_other)

    cache = fresh_with_prefix()
    streams = begin(t, cache, rows, SpecConfig(k=3), budget=11, suppress=SUPPRESS)
    out = [[s.token] for s in streams]
    chunks = iter(other[1:])
    while not all(s.done for s in streams):
        live = [s for s in streams if not s.done]
        verify = draft(pair.drafter, t, cache, live, SUPPRESS)
        chunk = next(chunks, None)
        extra = [Append(1, chunk)] if chunk is not None else []
        hidden = t.step_hidden(verify + extra, cache)
        if extra:
            with torch.inference_mode():
                got_logits = t.head(hidden[len(verify), len(chunk) - 1])
        new = accept(t, cache, live, verify, hidden[: len(verify)], suppress=SUPPRESS)
        for s, toks in zip(live, new, strict=True):
            out[streams.index(s)].extend(toks)
    assert out == ref
    assert cache.length(1) == ref_other.length(1)
    torch.testing.assert_close(got_logits, want_logits[0], atol=1e-5, rtol=0)


def test_speculative_equals_greedy_across_rollbacks(pair: Pair) -> None:
    """The engine's pattern on the slot itself: append context, mark, decode after closing
    tokens, roll back to the mark, append more context, decode again."""

    def run(decode: Decode) -> list[list[list[int]]]:
        cache = fresh(pair, 3)
        g = torch.Generator().manual_seed(30)
        out = []
        for _ in range(2):
            pair.target.step(prompt_rows(g, [30, 19, 3]), cache)  # kept context
            marks = [cache.mark(s) for s in range(3)]
            out.append(decode(cache, prompt_rows(g, [2, 4, 6])))  # closing tokens, decode
            for s, m in enumerate(marks):
                cache.rollback(s, m)
        return out

    three_ways(pair, 20, run)


def test_speculative_equals_greedy_in_branch_buffers(pair: Pair) -> None:
    """Two branch buffers per slot over shared prefixes (the engine's decode), twice."""

    def run(decode: Decode) -> list[list[list[int]]]:
        cache = fresh(pair, 2, branches=4)
        g = torch.Generator().manual_seed(40)
        pair.target.step(prompt_rows(g, [26, 9]), cache)
        out = []
        for _ in range(2):
            shapes = ((0, 0, 3), (0, 1, 8), (1, 0, 3), (1, 1, 8))  # slot, branch, tokens
            rows = [Append(s, randint(g, n), branch=2 * s + b) for s, b, n in shapes]
            for r in rows:
                assert r.branch is not None
                cache.reset_branch(r.branch)
            out.append(decode(cache, rows))
        return out

    three_ways(pair, 18, run)


# --- (c) loading -------------------------------------------------------------------------


def _copy_with(src: Path, dst: Path, edit: Any) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_loader_errors_name_the_key(pair: Pair, tmp_path: Path) -> None:
    src = pair.drafter_path / "drafter"
    bad = _copy_with(src, tmp_path / "missing", lambda t: t.pop("pre_projection.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) pre_projection\.weight"):
        dr.load(bad)
    key = "model.layers.3.self_attn.q_proj.weight"
    bad = _copy_with(src, tmp_path / "shape", lambda t: t.update({key: torch.zeros(64, 32)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.3\.self_attn\.q_proj\.weight'"):
        dr.load(bad)
    bad = _copy_with(src, tmp_path / "extra", lambda t: t.update({"foo.bar": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'foo\.bar'"):
        dr.load(bad)
    key = "model.layers.0.self_attn.k_proj.weight"  # a drafter layer has no K/V projections
    bad = _copy_with(src, tmp_path / "kproj", lambda t: t.update({key: torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        dr.load(bad)
    with pytest.raises(CheckpointError, match="gemma4_unified_assistant"):
        dr.load(pair.drafter_path / "target")


def test_drafter_must_fit_the_target(pair: Pair, tmp_path: Path) -> None:
    cfg = json.loads((pair.drafter_path / "drafter" / "config.json").read_text())
    d = dr.DrafterConfig.from_dict(cfg)
    d.check_target(pair.target.cfg.text)
    with pytest.raises(ConfigError, match="backbone_hidden_size 64 != target hidden_size 32"):
        small = dataclasses.replace(pair.target.cfg.text, hidden_size=32)
        d.check_target(small)
    cfg["backbone_hidden_size"] = 128
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(
        (pair.drafter_path / "drafter" / "model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="does not fit the target"):
        dr.load(bad, target=pair.target)
    cfg["text_config"]["num_kv_shared_layers"] = 2
    with pytest.raises(ConfigError, match="num_kv_shared_layers=2"):
        dr.DrafterConfig.from_dict(cfg)


def test_saved_drafter_loads_in_transformers_and_rawcast(pair: Pair, tmp_path: Path) -> None:
    """``drafter.save`` writes what transformers' ``from_pretrained`` reads back to the same
    weights (and config), and what rawcast reloads to the same proposals."""
    from transformers import Gemma4UnifiedAssistantForCausalLM

    out = dr.save(pair.drafter, tmp_path / "saved")
    hf = Gemma4UnifiedAssistantForCausalLM.from_pretrained(out).eval()
    ref = pair.hf_drafter.state_dict()
    got = hf.state_dict()
    assert set(got) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)
    for field in ("backbone_hidden_size", "use_ordered_embeddings", "tie_word_embeddings"):
        assert getattr(hf.config, field) == getattr(pair.hf_drafter.config, field)
    assert hf.config.text_config.layer_types == pair.hf_drafter.config.text_config.layer_types
    again = dr.load(out, target=pair.target)
    g = torch.Generator().manual_seed(11)
    cache = KVCache(pair.target.cfg.text, CacheSpec(slots=2, full_capacity=64, branch_room=8))
    rows = [Append(0, randint(g, 7)), Append(1, randint(g, 23))]
    with torch.inference_mode():
        hs = pair.target.step_hidden(rows, cache)
    last = hs[torch.arange(2), torch.tensor([6, 22])]
    nxt = [Append(r.slot, [5]) for r in rows]
    torch.testing.assert_close(
        again.propose(pair.target, cache, nxt, last, K),
        pair.drafter.propose(pair.target, cache, nxt, last, K),
    )
