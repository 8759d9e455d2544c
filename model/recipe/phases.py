"""A recipe: training phases run one after another by one resumable command.

``rawcast train --recipe shipped`` runs the phases that made the bundled checkpoint;
``--recipe FILE.json`` runs a list of your own. Each phase is a ``rawcast train`` run
of its own in ``RUN_DIR/NN-name`` that starts from the previous phase: from its run
directory (model and training-only heads) or, with ``"from": "export"``, from its
exported checkpoint (``RUN_DIR/NN-name/export``; the heads start afresh). Phases are
bounded by steps, not minutes, so the learning-rate schedule of a phase does not
depend on the machine. Run the same command again after a stop: finished phases are
skipped and the unfinished one resumes. The last phase exports to ``--out``.

A JSON recipe is a list of objects, e.g.::

    [{"name": "base", "steps": 3000, "frontend": "subwindow"},
     {"name": "tune", "steps": 1000, "lr": 5e-4, "task_mix": [0.5, 0.2, 0.3]}]

with the keys of ``PHASE_KEYS`` (``rawcast train``'s flags, dashes as underscores),
``"from"`` (``"run"`` or ``"export"``) and, on the first phase only, ``"init_from"``
(a run directory or checkpoint to start from).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rawcast.model.recipe.train import RunError

PHASE_KEYS = frozenset({
    "batch", "lr", "task_mix", "vision_weight", "voice_shift", "voice_warp",
    "caption_corrupt", "count_weight", "ctc_weight", "align_weight", "align_layers",
    "align_heads", "frontend", "precision", "layers", "hidden", "intermediate", "ctc_layer",
    "draw_from", "mixed", "mixed_align", "channel", "average_last", "train_clips",
})  # fmt: skip
STARTS = ("run", "export")
NO_TIME_BOUND = 1e9  # minutes: a phase ends at its steps, whatever the machine


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    start: str = "run"  # from the previous phase's run dir, or its "export"
    flags: dict[str, Any] = field(default_factory=dict)  # rawcast train's flags
    init_from: str = ""  # the first phase only: a run dir or checkpoint to start from


# The phases that made the bundled rawcast-tiny, as the README's commands give them (the
# first four and the tenth ran under a time budget; their steps are those they reached).
_FINAL = {"vision_weight": 1.0, "caption_corrupt": 0.5, "count_weight": 1.0}
_ALIGNED = {**_FINAL, "align_weight": 0.5, "ctc_weight": 3.0}
# phases 10 and 11 trained while --mixed still dropped the alignment windows of the
# transcriptions it put a picture in (--mixed-align off)
_MIXED = {"mixed": 0.25, "mixed_align": False}
_PHASE_8 = {"task_mix": (0.45, 0.15, 0.4), "lr": 4e-4, **_ALIGNED, "voice_shift": 0.8}
_PHASE_12 = {**_PHASE_8, "mixed": 0.25, "channel": 0.5}
SHIPPED: tuple[Phase, ...] = (
    Phase("sub", 6084, flags={"frontend": "subwindow"}),
    Phase("ft", 2481, flags={"task_mix": (0.5, 0.15, 0.35), "lr": 5e-4}),
    Phase("vis", 1647, flags={"task_mix": (0.0, 0.0, 1.0), "vision_weight": 1.0}),
    Phase("mix", 3268, flags={"task_mix": (0.45, 0.25, 0.3), "lr": 7e-4, "vision_weight": 1.0}),
    Phase("cap", 2800, flags={"task_mix": (0.4, 0.2, 0.4), "lr": 5e-4, **_FINAL}),
    Phase(
        "al",
        3400,
        "export",
        {"task_mix": (0.5, 0.2, 0.3), "lr": 7e-4, **_FINAL, "align_weight": 0.5},
    ),
    Phase(
        "vs",
        2600,
        "export",
        {"task_mix": (0.5, 0.2, 0.3), "lr": 7e-4, **_ALIGNED, "voice_shift": 0.5},
    ),
    Phase(
        "7b",
        1500,
        flags={"task_mix": (0.35, 0.15, 0.5), "lr": 4e-4, **_ALIGNED, "voice_shift": 0.5},
    ),
    Phase(
        "7c",
        1200,
        flags={"task_mix": (0.45, 0.15, 0.4), "lr": 3e-4, **_ALIGNED, "voice_shift": 0.8},
    ),
    Phase("8", 5000, flags=_PHASE_8),
    Phase("9", 12000, flags=_PHASE_8),
    # ran under a 100-minute budget; 7940 is the step it reached
    Phase("10", 7940, flags={**_PHASE_8, "draw_from": 12000, **_MIXED}),
    Phase("11", 6500, flags={**_PHASE_8, "draw_from": 19940, **_MIXED}),
    # from phase 11's export (its run directory did not survive a change of VM: the
    # training-only heads start afresh); half the speech through a random channel
    Phase("12", 5000, "export", {**_PHASE_12, "draw_from": 26440}),
    # from phase 12's export (its run directory did not survive either): more of phase 12
    # on the batches after it
    Phase("13", 5000, "export", {**_PHASE_12, "draw_from": 31440}),
)
RECIPES = {"shipped": SHIPPED}


def load(spec: str) -> tuple[Phase, ...]:
    """A built-in recipe by name, or a JSON file's phases (checked: RunError says what
    to fix)."""
    if spec in RECIPES:
        return RECIPES[spec]
    path = Path(spec)
    if not path.is_file():
        raise RunError(f"--recipe {spec}: neither a recipe name ({', '.join(RECIPES)}) nor a file")
    try:
        items = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"--recipe {spec}: not a JSON list of phases ({e})") from e
    if not isinstance(items, list) or not items:
        raise RunError(f"--recipe {spec}: give a JSON list of phases, e.g. {_EXAMPLE}")
    return tuple(_phase(item, i, spec) for i, item in enumerate(items))


_EXAMPLE = '[{"name": "base", "steps": 3000}]'


def _phase(item: Any, i: int, spec: str) -> Phase:
    where = f"--recipe {spec}, phase {i + 1}"
    if not isinstance(item, dict):
        raise RunError(f"{where}: give an object, e.g. {_EXAMPLE[1:-1]}")
    item = dict(item)
    name, steps = item.pop("name", f"phase{i + 1}"), item.pop("steps", None)
    start, init_from = item.pop("from", "run"), item.pop("init_from", "")
    if not isinstance(name, str) or not name or "/" in name:
        raise RunError(f"{where}: 'name' must be a plain word (it names the run directory)")
    if not isinstance(steps, int) or steps < 1:
        raise RunError(f"{where}: give 'steps', a whole number >= 1")
    if start not in STARTS:
        raise RunError(f"{where}: 'from' is one of {', '.join(STARTS)}, not {start!r}")
    if init_from and i:
        raise RunError(f"{where}: only the first phase takes 'init_from' (later ones start "
                       "from the phase before)")  # fmt: skip
    unknown = sorted(set(item) - PHASE_KEYS)
    if unknown:
        raise RunError(
            f"{where}: unknown key {unknown[0]!r}; phases take {', '.join(sorted(PHASE_KEYS))}"
        )
    for key in ("task_mix", "align_layers"):
        if key in item:
            item[key] = tuple(item[key])
    return Phase(name, steps, start, item, str(init_from))


def phase_dir(run_root: Path, i: int, phase: Phase) -> Path:
    return run_root / f"{i + 1:02d}-{phase.name}"


def steps_done(run_dir: Path) -> int:
    """The step a phase's run directory has saved (0 when it has none)."""
    state = run_dir / "state.pt"
    if not state.exists():
        return 0
    return int(torch.load(state, map_location="cpu", weights_only=False, mmap=True)["step"])


def run(
    phases: Sequence[Phase],
    run_root: Path,
    out_dir: Path,
    train_one: Callable[..., Any],
    log: Callable[[str], None] = print,
) -> Path:
    """Run the phases in order with ``train_one(run_dir=, out_dir=, init_from=, steps=,
    max_minutes=, **flags)`` (``commands.train_command`` less the shared arguments),
    skipping those already done. Returns ``out_dir``."""
    outs = [out_dir if i == len(phases) - 1 else phase_dir(run_root, i, ph) / "export"
            for i, ph in enumerate(phases)]  # fmt: skip
    done = [steps_done(phase_dir(run_root, i, ph)) for i, ph in enumerate(phases)]
    finished = [n >= ph.steps and (o / "config.json").exists()
                for n, ph, o in zip(done, phases, outs, strict=True)]  # fmt: skip
    first_open = finished.index(False) if False in finished else len(phases)
    stale = [
        phase_dir(run_root, j, phases[j]) for j in range(first_open + 1, len(phases)) if done[j]
    ]
    if stale:
        open_dir = phase_dir(run_root, first_open, phases[first_open])
        raise RunError(
            f"{stale[0]} has trained from an unfinished {open_dir}: remove it (and the "
            "phases after it) to train them again from that phase's end"
        )
    prev: Path | None = None
    for i, ph in enumerate(phases):
        rd, out = phase_dir(run_root, i, ph), outs[i]
        if prev is None:
            src = Path(ph.init_from) if ph.init_from else None
        else:
            src = prev / "export" if ph.start == "export" else prev
        head = f"phase {i + 1}/{len(phases)} {ph.name}"
        if finished[i]:
            log(f"{head}: done ({done[i]} steps), skipped")
        else:
            log(f"{head}: {ph.steps} steps in {rd}" + (f" from {src}" if src else ""))
            train_one(run_dir=rd, out_dir=out, init_from=src, steps=ph.steps,
                      max_minutes=NO_TIME_BOUND, **ph.flags)  # fmt: skip
        prev = rd
    return out_dir
