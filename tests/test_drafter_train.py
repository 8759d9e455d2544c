"""The drafter recipe (``rawcast train --drafter``) teaches what speculative decoding needs.

A drafter trained by ``draft_losses`` on a frozen random target's own greedy
continuations must then PROPOSE those continuations through ``Drafter.propose``
(the inference path: slot cache, positions, the sliding window, the post-projection
chain), so acceptance goes from near zero to near one while the output stays exactly
the target's greedy tokens. A mismatch between the training and inference views of
positions, masks or the hidden-state chain shows up here as low acceptance.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from rawcast.model import drafter as dr
from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.config import preset
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.recipe import drafter_train as DT
from rawcast.model.recipe import train as T
from rawcast.model.speculative import SpecConfig, generate, greedy

PROMPT = 9
NEW = 24  # prompt + continuation is longer than the target's window (16)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def setup() -> tuple[Gemma4Unified, list[list[int]], torch.Tensor]:
    torch.manual_seed(0)
    cfg = preset("tiny")  # untied head: a tied random model just repeats its input token
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
    target = Gemma4Unified(cfg).eval()
    suppress = torch.tensor([0, 1, 2, *range(500, 507)])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (PROMPT,), generator=g) for _ in range(4)]
    cache = KVCache(target.cfg.text, CacheSpec(slots=4, full_capacity=64, branch_room=16))
    conts = greedy(
        target, cache, [Append(i, p) for i, p in enumerate(prompts)], NEW, suppress=suppress
    )
    seqs = [[*p.tolist(), *c] for p, c in zip(prompts, conts, strict=True)]
    return target, seqs, suppress


def acceptance(
    target: Gemma4Unified, drafter: dr.Drafter, seqs: list[list[int]], suppress: torch.Tensor
) -> float:
    cache = KVCache(target.cfg.text, CacheSpec(slots=4, full_capacity=64, branch_room=16))
    rows = [Append(i, s[:PROMPT]) for i, s in enumerate(seqs)]
    res = generate(target, drafter, cache, rows, NEW, SpecConfig(k=3, k_max=3), suppress=suppress)
    assert res.tokens == [s[PROMPT:] for s in seqs]  # exactly greedy, trained or not
    assert all(len(set(s[PROMPT:])) > NEW // 2 for s in seqs)  # not a repeated token
    return res.acceptance


def test_trained_drafter_proposes_the_targets_greedy_tokens() -> None:
    target, seqs, suppress = setup()
    cfg = DT.drafter_config(target.cfg.text, layers=2, hidden=64, intermediate=128)
    cfg.check_target(target.cfg.text)
    drafter = dr.Drafter(cfg)
    DT.init_drafter(drafter, 3)
    before = acceptance(target, drafter.eval(), seqs, suppress)
    batch = [T.Example(tokens=s, loss_from=PROMPT) for s in seqs]
    p, labels = T.pack_batch(target, batch)
    feats = DT.target_features(target, p)
    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    drafter.train()
    for _ in range(150):
        out = DT.draft_losses(drafter, target, p, labels, feats, k=3)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["accept"]) > 2.5  # of 3 teacher-forced drafts per query
    after = acceptance(target, drafter.eval(), seqs, suppress)
    assert before < 0.2
    assert after > 0.9, (before, after)


def test_recipe_drafter_fits_its_target_and_round_trips(tmp_path: Path) -> None:
    target, _, _ = setup()
    cfg = DT.drafter_config(target.cfg.text, layers=3, hidden=32, intermediate=64)
    assert cfg.text.layer_types[-1] == "full_attention"
    assert cfg.text.num_attention_heads % target.cfg.text.num_key_value_heads == 0
    drafter = dr.Drafter(cfg)
    DT.init_drafter(drafter, 1)
    out = tmp_path / "drafter"
    DT.export(drafter, out)
    again = dr.load(out, target=target)
    for (name, a), (_, b) in zip(
        drafter.state_dict().items(), again.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_training_view_equals_the_inference_view() -> None:
    """The first draft step that ``draft_losses`` trains, at every answer position,
    computes the state ``Drafter.propose`` computes from a slot cache holding the
    same prefix: same token, hidden state, positions and K/V masks, also past the
    sliding window."""
    target, seqs, _ = setup()
    cfg = DT.drafter_config(target.cfg.text, layers=2, hidden=32, intermediate=64)
    drafter = dr.Drafter(cfg).eval()
    DT.init_drafter(drafter, 7)
    states: list[torch.Tensor] = []
    hook = drafter.norm.register_forward_hook(lambda _m, _i, o: states.append(o.detach()))
    try:
        batch = [T.Example(tokens=s, loss_from=PROMPT) for s in seqs]
        p, labels = T.pack_batch(target, batch)
        with torch.no_grad():
            DT.draft_losses(drafter, target, p, labels, DT.target_features(target, p), k=1)
        trained = states.pop()  # (B, T - 1, H): query at position i + 1
        for b, s in enumerate(seqs):
            for q in range(PROMPT, len(s) - 1):
                cache = KVCache(target.cfg.text, CacheSpec(slots=1, full_capacity=64))
                with torch.inference_mode():
                    hidden = target.step_hidden([Append(0, s[:q])], cache)[0, q - 1]
                    drafter.propose(target, cache, [Append(0, [s[q]])], hidden[None], 1)
                torch.testing.assert_close(
                    states.pop()[0, 0], trained[b, q - 1], atol=2e-5, rtol=1e-4,
                    msg=f"sequence {b}, position {q}",
                )  # fmt: skip
    finally:
        hook.remove()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_rawcast_train_drafter_trains_resumes_and_exports(tmp_path: Path) -> None:
    """``rawcast train --drafter`` on a small slice of the recipe's data: it trains the
    bundled model's drafter, exports a checkpoint that loads for that model, and a
    second run with more steps resumes from the saved state."""
    import json
    import random

    from rawcast.model import loader
    from rawcast.model.recipe import data as D
    from rawcast.model.recipe import text
    from rawcast.transports.cli import build_parser

    rng = random.Random(0)
    pairs = [list(text.grammar_pair(rng)) for _ in range(8)]
    data = tmp_path / "data"
    data.mkdir()
    sents = {"train_grammar": pairs, "eval_grammar": pairs, "train_prose": [], "eval_prose": []}
    (data / "sentences.json").write_text(json.dumps(sents))
    D.generate(data, D.DataConfig(seed=7, train_clips=4, eval_clips_per_voice=0), workers=1,
               splits=("train",))  # fmt: skip
    run, out = tmp_path / "run", tmp_path / "drafter"
    argv = ["train", "--drafter", "--data-dir", str(data), "--run-dir", str(run),
            "--out", str(out), "--batch", "2"]  # fmt: skip
    for steps in (2, 3):
        args = build_parser().parse_args([*argv, "--steps", str(steps)])
        assert args.func(args) == 0
        assert torch.load(run / "state.pt", weights_only=False)["step"] == steps
    drafter = dr.load(out, target=loader.load("rawcast-tiny"))
    assert drafter.cfg.backbone_hidden_size == loader.load("rawcast-tiny").cfg.text.hidden_size
    assert len((run / "log.jsonl").read_text().splitlines()) == 3  # 2 steps, then 1 more
