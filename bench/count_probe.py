"""Where do a checkpoint's caption counts go wrong: in what the picture's cells know, or
in the word the decoder writes?

For each of ``rawcast eval``'s scenes (held-out and seen compositions), the greedy first
caption word (the first group's count: ``a``/``an`` for one, ``two``, ``three``) is read
after the caption prompt and the picture, and tabulated against the true one. With
``--run DIR`` (a run directory: its ``state.pt`` keeps the training-only count head,
``rawcast train --count-weight``), that head also reads every cell a shape is centred in
at the run's middle layer and says how many shapes its group has: the picture-side
count, before any decoding.

    python bench/count_probe.py --model rawcast-tiny --run runs/amA --scenes 100
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import Counter
from pathlib import Path

import torch
from caption_probe import EVAL_SEED, next_word
from torch import nn

from rawcast.model import loader
from rawcast.model.gemma4 import Append, Gemma4Unified, rms_norm
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import decode, scenes
from rawcast.model.recipe import train as T
from rawcast.pipeline.vision import patch_image

WORDS = {"a": 1, "an": 1, "two": 2, "three": 3}


def count_head(run: Path, hidden: int) -> tuple[nn.Linear, int]:
    """The run's count head and the layer it reads (``--ctc-layer``'s, as in training)."""
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=False, mmap=True)
    if "count_head" not in state:
        raise SystemExit(f"{run}: trained without --count-weight (no count head)")
    head = T.count_head(hidden)
    head.load_state_dict(state["count_head"])
    layer = int(json.loads((run / "train_config.json").read_text())["ctc_layer"])
    return head, layer


def cell_counts(
    model: Gemma4Unified, head: nn.Linear, layer: int, cells: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The head's group size at each image cell (raster order)."""
    assert model.tokenizer is not None
    fmt = PromptFormat(model.tokenizer)
    media, branch = decode.prompt_ids(fmt, 0, "caption", int(cells[0].shape[0]))
    p = model.pack([Append(slot=0, tokens=media + branch, images=[cells])], None)
    _, mid = T.hidden_states(model, p, layer)
    pos = (p.input_ids[0] == model.cfg.tokens.image).nonzero().view(-1)
    return head(rms_norm(mid[0, pos], None, 1e-6)).argmax(-1)


def probe(
    model: Gemma4Unified, n_scenes: int, held: bool, head: tuple[nn.Linear, int] | None
) -> tuple[float, Counter[tuple[int, int]], float | None]:
    """First-word accuracy, (true, written) counts, and the count head's cell accuracy."""
    words: Counter[tuple[int, int]] = Counter()
    cells_ok = cells_n = 0
    for i in range(n_scenes):
        img, cap, (colour, shape) = scenes.labelled_scene(EVAL_SEED, i, held)
        grid = patch_image(img, max_soft_tokens=model.image_budget)
        cells = (torch.from_numpy(grid.cells), torch.from_numpy(grid.positions))
        got = WORDS.get(next_word(model, cells, ""), 0)  # 0: not a count word
        words[(WORDS[cap.split()[0]], got)] += 1
        if head is not None:
            pred = cell_counts(model, head[0], head[1], cells)
            want = torch.from_numpy(T.count_labels(colour, shape))
            on = torch.from_numpy(shape > 0)
            cells_ok += int((pred[on] == want[on]).sum())
            cells_n += int(on.sum())
    right = sum(n for (t, g), n in words.items() if t == g)
    return right / max(1, n_scenes), words, cells_ok / cells_n if cells_n else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="rawcast-tiny", help="bundled name or checkpoint dir")
    ap.add_argument("--run", type=Path, default=None, help="its run dir: the count head too")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = loader.load(args.model)
    model.eval()
    head = count_head(args.run, model.cfg.text.hidden_size) if args.run else None
    print(
        f"# bench/count_probe.py on {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {args.scenes} scenes each, {args.model}"
        + (f", count head of {args.run}" if args.run else "")
    )
    print("| compositions | first word right | count head right (shape cells) | "
          "true -> written (scenes) |")  # fmt: skip
    print("|---|---|---|---|")
    with torch.no_grad():
        for held in (True, False):
            first, conf, cell_acc = probe(model, args.scenes, held, head)
            pairs = ", ".join(f"{t}->{g or '?'}: {n}" for (t, g), n in sorted(conf.items()))
            cells = "" if cell_acc is None else f"{100 * cell_acc:.0f} %"
            what = "held-out" if held else "seen"
            print(f"| {what} | {100 * first:.0f} % | {cells} | {pairs} |", flush=True)


if __name__ == "__main__":
    main()
