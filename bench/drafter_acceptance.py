"""How often the engine keeps each drafter's drafts, on held-out eval clips.

Each clip goes to a new ``EngineCore`` session (transcription and Spanish, no VAD, the
whole clip then the end of input), one session at a time, with each ``--drafter`` in
turn on the same model; prints the share of drafted tokens the target kept and how many
it drafted. The text is plain greedy's whichever drafter runs, so this is the figure to
pick a drafter by (its speed is ``bench/speculative.py``'s). Needs the recipe's eval
shards (``rawcast train`` generates them).

    python bench/drafter_acceptance.py --drafter rawcast-tiny-drafter --drafter runs/x-model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rawcast.model import drafter as dr
from rawcast.model.loader import load
from rawcast.model.recipe.evaluate import heldout_clips
from rawcast.pipeline.engine import EngineConfig, EngineCore
from rawcast.pipeline.replay import replay
from rawcast.pipeline.session import SessionConfig, Tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="rawcast-tiny")
    ap.add_argument("--drafter", action="append", required=True, help="repeat to compare")
    ap.add_argument("--data-dir", type=Path, default=Path("data/rawcast-tiny"))
    ap.add_argument("--clips", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = load(args.model)
    clips = [audio for _, audio, _ in heldout_clips(args.data_dir, args.clips)]
    cfg = SessionConfig(tasks=Tasks(transcribe=True, translate="Spanish"), vad=None)
    for name in args.drafter:
        drafter = dr.load(name, target=target)
        core = EngineCore(target, EngineConfig(max_sessions=1), drafter=drafter)
        for audio in clips:
            replay(core, [audio], cfg)
        print(f"{name}: {len(clips)} clips, {core.acceptance:.1%} of {core.drafted} drafts kept")


if __name__ == "__main__":
    main()
