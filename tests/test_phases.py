"""``rawcast train --recipe``: phases run in order, each from the one before, resumable."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_recipe import SMALL, _training_slice, needs_espeak

from rawcast.model.recipe import commands
from rawcast.model.recipe import phases as P
from rawcast.model.recipe import train as T


def _fake_trainer(calls: list[dict[str, Any]]) -> Any:
    """A ``train_one`` that records its call and leaves what a finished phase leaves."""

    def train_one(**kw: Any) -> None:
        calls.append(kw)
        kw["run_dir"].mkdir(parents=True, exist_ok=True)
        torch.save({"step": kw["steps"]}, kw["run_dir"] / "state.pt")
        kw["out_dir"].mkdir(parents=True, exist_ok=True)
        (kw["out_dir"] / "config.json").write_text("{}")

    return train_one


def test_the_shipped_recipe_is_what_train_accepts() -> None:
    """Every phase of ``--recipe shipped`` names only flags ``rawcast train`` has, and the
    chain starts from scratch with the spectrogram front end, as the shipped one did."""
    params = set(inspect.signature(commands.train_command).parameters)
    assert P.PHASE_KEYS <= params
    assert P.PHASE_KEYS <= commands.RECIPE_SETS
    assert P.load("shipped") == P.SHIPPED
    assert P.SHIPPED[0].flags == {"frontend": "subwindow"} and not P.SHIPPED[0].init_from
    for ph in P.SHIPPED:
        assert set(ph.flags) <= P.PHASE_KEYS and ph.steps > 0 and ph.start in P.STARTS
        if "task_mix" in ph.flags:
            assert abs(sum(ph.flags["task_mix"]) - 1) < 1e-9
    assert [ph.name for ph in P.SHIPPED if ph.start == "export"] == ["al", "vs", "12", "13"]
    assert sum(ph.steps for ph in P.SHIPPED) == 66_420
    # phase 11 draws the batches after phases 9 and 10's 12000 + 7940 steps, phase 12
    # those after phase 11's 6500 more, phase 13 those after phase 12's 5000
    p11, p12, p13 = P.SHIPPED[-3:]
    assert p11.flags["draw_from"] == 19940 and p12.flags["draw_from"] == 26440
    assert p13.flags["draw_from"] == 31440
    assert p11.flags["mixed"] == p12.flags["mixed"] == p13.flags["mixed"] == 0.25
    assert p11.flags["mixed_align"] is False  # as phases 10 and 11 trained
    assert "mixed_align" not in p12.flags and p12.flags["channel"] == 0.5
    assert {**p13.flags, "draw_from": 26440} == p12.flags  # more of phase 12


def test_phases_chain_and_a_second_call_resumes_where_the_first_stopped(tmp_path: Path) -> None:
    recipe = (
        P.Phase("a", 5, flags={"lr": 1e-3}, init_from=str(tmp_path / "seed")),
        P.Phase("b", 3, "export", {"task_mix": (0.0, 0.0, 1.0)}),
        P.Phase("c", 2),
    )
    calls: list[dict[str, Any]] = []
    logs: list[str] = []
    out = tmp_path / "out"
    P.run(recipe, tmp_path / "runs", out, _fake_trainer(calls), logs.append)
    a, b, c = (tmp_path / "runs" / n for n in ("01-a", "02-b", "03-c"))
    assert [k["run_dir"] for k in calls] == [a, b, c]
    assert [k["init_from"] for k in calls] == [tmp_path / "seed", a / "export", b]
    assert [k["out_dir"] for k in calls] == [a / "export", b / "export", out]
    assert [k["steps"] for k in calls] == [5, 3, 2]
    assert all(k["max_minutes"] == P.NO_TIME_BOUND for k in calls)  # steps decide the schedule
    assert calls[0]["lr"] == 1e-3 and calls[1]["task_mix"] == (0.0, 0.0, 1.0)
    assert "lr" not in calls[2]

    # Done: a second call trains nothing.
    calls.clear()
    P.run(recipe, tmp_path / "runs", out, _fake_trainer(calls), logs.append)
    assert calls == []
    # Stopped in phase b (c not begun): the next call skips a, resumes b, then runs c.
    torch.save({"step": 1}, b / "state.pt")
    (c / "state.pt").unlink()
    calls.clear()
    logs.clear()
    P.run(recipe, tmp_path / "runs", out, _fake_trainer(calls), logs.append)
    assert [k["run_dir"] for k in calls] == [b, c]
    assert logs[0] == "phase 1/3 a: done (5 steps), skipped"
    # A later phase that trained from an unfinished one is refused, not resumed.
    torch.save({"step": 1}, b / "state.pt")
    with pytest.raises(T.RunError, match=r"03-c has trained from an unfinished .*02-b: remove it"):
        P.run(recipe, tmp_path / "runs", out, _fake_trainer(calls), logs.append)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"name": "a"}', "JSON list of phases"),
        ("[]", "JSON list of phases"),
        ("not json", "not a JSON list"),
        ('[{"name": "a"}]', "give 'steps'"),
        ('[{"steps": 0}]', "give 'steps'"),
        ('[{"steps": 5, "from": "ckpt"}]', "'from' is one of run, export"),
        ('[{"steps": 5, "lr_peak": 1}]', "unknown key 'lr_peak'"),
        ('[{"steps": 5}, {"steps": 5, "init_from": "x"}]', "phase 2: only the first phase"),
        ('[{"steps": 5, "name": "../up"}]', "plain word"),
    ],
)
def test_a_bad_recipe_file_says_what_to_fix(tmp_path: Path, content: str, says: str) -> None:
    f = tmp_path / "r.json"
    f.write_text(content)
    with pytest.raises(T.RunError, match=says.replace("(", r"\(")):
        P.load(str(f))


def test_a_recipe_file_gives_its_phases(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    items = [
        {"name": "base", "steps": 30, "frontend": "subwindow", "init_from": "runs/x"},
        {"steps": 10, "from": "export", "task_mix": [0.5, 0.2, 0.3], "align_layers": [-1]},
    ]
    f.write_text(json.dumps(items))
    a, b = P.load(str(f))
    assert (a.name, a.steps, a.init_from, a.flags) == (
        "base",
        30,
        "runs/x",
        {"frontend": "subwindow"},
    )
    assert (b.name, b.start, b.flags) == (
        "phase2",
        "export",
        {"task_mix": (0.5, 0.2, 0.3), "align_layers": (-1,)},
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--recipe", "shipped", "--lr", "1e-3"], "--recipe sets each phase's --lr: drop it"),
        (["--recipe", "shipped", "--steps", "10"], "--recipe sets each phase's --steps"),
        (["--recipe", "shipped", "--drafter"], "--recipe trains the model, not its drafter"),
        (["--recipe", "nothing-here"], "--recipe nothing-here: neither a recipe name (shipped)"),
    ],
)
def test_recipe_mistakes_exit_2_in_one_line(
    argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawcast.transports.cli import main

    monkeypatch.setattr(commands, "train_command", lambda **kw: pytest.fail("trained"))
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_the_cli_runs_the_recipe_with_its_shared_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rawcast.transports.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(commands, "train_command", _fake_trainer(calls))
    argv = ["train", "--recipe", "shipped", "--run-dir", str(tmp_path)]
    argv += ["--out", str(tmp_path / "o"), "--threads", "2", "--seed", "9"]
    assert main(argv) == 0
    assert len(calls) == len(P.SHIPPED) and calls[-1]["out_dir"] == tmp_path / "o"
    assert all(k["threads"] == 2 and k["seed"] == 9 and k["procs"] == 1 for k in calls)
    assert calls[0]["frontend"] == "subwindow" and calls[0]["init_from"] is None


def test_a_phase_may_train_on_more_clips_than_the_ones_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train_clips`` is a phase's own: a later phase may extend the data (the first
    shards stay those of the phases before); phases without it keep the default."""
    from rawcast.transports.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(commands, "train_command", _fake_trainer(calls))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"name": "a", "steps": 2},
                                  {"name": "b", "steps": 1, "train_clips": 30000}]))  # fmt: skip
    argv = ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    assert main(["train", "--recipe", str(recipe), *argv]) == 0
    assert [k["train_clips"] for k in calls] == [10_500, 30_000]
    assert main(["train", "--recipe", str(recipe), "--train-clips", "5"]) == 2


@needs_espeak
def test_a_two_phase_recipe_trains_for_real_and_resumes(tmp_path: Path) -> None:
    """On a tiny slice: phase 2 starts from phase 1's weights, the last phase exports a
    checkpoint, and a repeated call trains nothing more."""
    from rawcast.model.loader import load

    dcfg = _training_slice(tmp_path)

    def train_one(run_dir: Path, out_dir: Path, init_from: Path | None, steps: int,
                  max_minutes: float, **flags: Any) -> None:  # fmt: skip
        cfg = T.TrainConfig(steps=steps, max_minutes=max_minutes,
                            init_from=str(init_from or ""), **{**SMALL, **flags})  # fmt: skip
        T.train(tmp_path, run_dir, out_dir, cfg, dcfg, log=lambda _: None)

    recipe = (P.Phase("one", 2), P.Phase("two", 1, "export", {"lr": 1e-3}))
    P.run(recipe, tmp_path / "runs", tmp_path / "out", train_one, lambda _: None)
    one, two = tmp_path / "runs" / "01-one", tmp_path / "runs" / "02-two"
    assert P.steps_done(one) == 2 and P.steps_done(two) == 1
    assert json.loads((two / "train_config.json").read_text())["init_from"] == str(one / "export")
    first = torch.load(one / "state.pt", weights_only=False)["model"]
    # One step at lr 1e-3 (warmup's first step: lr / 200) moves phase 1's weights a little.
    after = load(tmp_path / "out").state_dict()
    emb = "embed_tokens.weight"
    assert (after[emb] - first[emb]).abs().max() < 1e-3 < (after[emb] - first[emb]).abs().sum()
    lines = [len((d / "log.jsonl").read_text().splitlines()) for d in (one, two)]
    P.run(recipe, tmp_path / "runs", tmp_path / "out", train_one, lambda _: None)
    assert [len((d / "log.jsonl").read_text().splitlines()) for d in (one, two)] == lines
