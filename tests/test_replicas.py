"""``rawcast train --procs N``: data-parallel training over CPU processes (loopback gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_recipe import SMALL, _training_slice, needs_espeak

from rawcast.model.recipe import train as T
from rawcast.model.recipe.replicas import Replicas, launch


def _average(rep: Replicas, out: str) -> None:
    """Rank r's gradients: a = r + 1 everywhere, b only on rank 0, c on none."""
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), rep.rank + 1.0)
    b.grad = torch.full((3,), 4.0) if rep.rank == 0 else None
    rep.average_grads([a, b, c])
    vals = rep.mean_values({"loss": float(rep.rank), **({"vision": 5.0} if rep.rank else {})},
                           ("loss", "vision", "count"))  # fmt: skip
    synced = rep.in_sync([torch.ones(2)])
    drifted = rep.in_sync([torch.full((2,), float(rep.rank))])
    got = {
        "a": a.grad.tolist(),
        "b": None if b.grad is None else b.grad.tolist(),
        "c": c.grad is None,
        "vals": vals,
        "lr": rep.leaders(0.1 * (rep.rank + 1), 1.0),
        "synced": synced,
        "drifted": drifted,
    }
    Path(out, f"rank{rep.rank}.json").write_text(json.dumps(got))


def test_replicas_average_gradients_and_agree_on_rank_0s_clock(tmp_path: Path) -> None:
    """The mean of each gradient over the replicas (a missing one counts as zero, one no
    replica has stays None), logged values averaged over those that have them, rank 0's
    learning rate everywhere, and a weight check that tells equal replicas from drifted."""
    launch(2, _average, str(tmp_path))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["a"] == [1.5] * 3 and got["b"] == [2.0] * 3 and got["c"] is True
        assert got["vals"] == {"loss": 0.5, "vision": 5.0}
        assert got["lr"] == pytest.approx([0.1, 1.0])
        assert got["synced"] is True and got["drifted"] is False


def _fail(rep: Replicas) -> None:
    if rep.rank == 1:
        raise T.RunError("rank 1 cannot start")
    rep.leaders(0.0)  # waits for rank 1, which is gone


def test_an_error_in_one_replica_is_raised_as_it_was() -> None:
    with pytest.raises(T.RunError, match="rank 1 cannot start"):
        launch(2, _fail)


@needs_espeak
def test_the_shares_of_a_batch_are_the_single_process_batch(tmp_path: Path) -> None:
    """Replica r of n makes examples r, r + n, ... of the very batch one process makes
    (the same tasks, audio, voice shift, pictures and targets), so a run's data does not
    depend on --procs."""
    dcfg = _training_slice(tmp_path)
    cfg = T.TrainConfig(**{**SMALL, "batch": 8}, voice_shift=0.5, caption_corrupt=0.5,
                        task_mix=(0.4, 0.2, 0.4))  # fmt: skip
    tr = T.build(tmp_path, cfg, dcfg)
    for step in range(4):
        whole = T.make_batch(tr.fmt, tr.corpus, cfg, step, tr.lex)
        shares = [T.make_batch(tr.fmt, tr.corpus, cfg, step, tr.lex, (r, 2)) for r in (0, 1)]
        merged = [ex for pair in zip(*shares, strict=True) for ex in pair]
        assert len(merged) == len(whole) == 8
        for x, y in zip(whole, merged, strict=True):
            assert (x.task, x.tokens, x.inputs, x.ctc, x.align) == (
                y.task, y.tokens, y.inputs, y.ctc, y.align
            )  # fmt: skip
            assert (x.audio is None) == (y.audio is None)
            assert x.audio is None or np.array_equal(x.audio, y.audio)
            assert (x.image is None) == (y.image is None)
            assert x.image is None or all(map(torch.equal, x.image, y.image))
    assert {ex.task for ex in whole} >= {"transcribe", "caption"}


def _emulated(tr: T.Trainer, cfg: T.TrainConfig, lrs: list[float]) -> None:
    """What two replicas compute, in one process: each share's gradient of its own
    loss, their mean (a missing one counting as zero), one clipped AdamW step."""
    for step, lr in enumerate(lrs):
        grads = []
        for r in (0, 1):
            tr.opt.zero_grad(set_to_none=True)
            share = T.make_batch(tr.fmt, tr.corpus, cfg, step, tr.lex, (r, 2))
            T.losses(tr.model, tr.head, share, cfg, tr.vhead, tr.chead)["loss"].backward()
            grads.append([p.grad for p in tr.params])
        for p, g0, g1 in zip(tr.params, *grads, strict=True):
            have = [g for g in (g0, g1) if g is not None]
            p.grad = sum(have, torch.zeros_like(p)) / 2 if have else None
        torch.nn.utils.clip_grad_norm_(tr.params, 1.0)
        for g in tr.opt.param_groups:
            g["lr"] = lr
        tr.opt.step()


@needs_espeak
def test_a_two_process_run_is_the_mean_of_its_shares_and_either_resumes_it(
    tmp_path: Path,
) -> None:
    """``T.train(procs=2)``: one log line per step, a checkpoint that loads and equals
    the same steps taken in one process with the two shares' gradients averaged (what
    data-parallel training is; each share's loss is its own mean, as in torch's DDP),
    and a state a one-process run resumes."""
    from rawcast.model.loader import load

    dcfg = _training_slice(tmp_path)
    cfg = T.TrainConfig(**{**SMALL, "batch": 4}, steps=3, lr=1e-3, warmup=1)
    logs: list[str] = []
    # a closure: rank 0 logs in this process, the callback is never pickled
    T.train(tmp_path, tmp_path / "two", tmp_path / "out", cfg, dcfg,
            log=lambda line: logs.append(line), procs=2)  # fmt: skip
    assert any(line.endswith(", 2 processes") for line in logs)
    recs = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]

    tr = T.build(tmp_path, cfg, dcfg)
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    _emulated(tr, cfg, [r["lr"] for r in recs])
    two = load(tmp_path / "out").state_dict()
    for k, v in tr.model.state_dict().items():
        if v.is_floating_point() and not torch.equal(v, start[k]):
            assert torch.allclose(two[k], v, rtol=1e-4, atol=1e-6), k
    assert any(not torch.equal(v, start[k]) for k, v in two.items())  # it trained

    longer = T.TrainConfig(**{**SMALL, "batch": 4}, steps=4, lr=1e-3, warmup=1)
    resumed: list[str] = []
    T.train(tmp_path, tmp_path / "two", tmp_path / "out", longer, dcfg, log=resumed.append)
    assert any(line.startswith("resumed from") and "at step 3" in line for line in resumed)
    assert torch.load(tmp_path / "two" / "state.pt", weights_only=False)["step"] == 4


def test_procs_are_refused_where_they_cannot_split_the_batch(tmp_path: Path) -> None:
    with pytest.raises(T.RunError, match="--batch 3 does not split into --procs 2"):
        T.train(tmp_path, tmp_path / "r", tmp_path / "o", T.TrainConfig(batch=3), None,  # type: ignore[arg-type]
                procs=2)  # fmt: skip
