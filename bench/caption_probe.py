"""Does a checkpoint see a held-out composition's shape, or does its caption prior hide it?

For each held-out scene (``rawcast eval``'s scenes), the caption is teacher-forced up to
the colour of its first held-out (colour, shape) pair, and the greedy next word is read
twice: after the true colour (the pair it never saw in training), and after each of up
to three colours that DO appear with that shape in training. If the shape is named
right after a seen colour but not after the true one, the picture's shape reaches the
decoder and the colour word before it overrides it (what ``rawcast train
--caption-corrupt`` trains against).

    python bench/caption_probe.py --model rawcast-tiny --scenes 60
"""

from __future__ import annotations

import argparse
import platform

import torch

from rawcast.model import loader
from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import decode, scenes
from rawcast.pipeline.vision import patch_image

EVAL_SEED = 1234 + 999  # the scenes ``rawcast eval`` scores (its seed + 999)


def next_word(model: Gemma4Unified, cells: tuple[torch.Tensor, torch.Tensor], prefix: str) -> str:
    """The greedy next token after the caption prompt, the picture and ``prefix``."""
    assert model.tokenizer is not None
    fmt = PromptFormat(model.tokenizer)
    head, branch = decode.prompt_ids(fmt, 0, "caption", int(cells[0].shape[0]))
    body = model.tokenizer.encode(prefix)
    room = len(branch) + len(body) + 8
    spec = CacheSpec(slots=1, full_capacity=len(head) + room, branch_room=room)
    cache = KVCache(model.cfg.text, spec, device=model.device, dtype=model.dtype)
    model.step([Append(slot=0, tokens=head, images=[cells])], cache)
    logits = model.step([Append(slot=0, tokens=branch + body)], cache)
    return model.tokenizer.decode([int(logits[0].argmax())]).strip()


def probe(model: Gemma4Unified, n_scenes: int) -> dict[str, float]:
    true_ok = seen_ok = 0.0
    n = 0
    for i in range(n_scenes):
        img, cap = scenes.scene(EVAL_SEED, i, heldout=True)
        grid = patch_image(img, max_soft_tokens=model.image_budget)
        cells = (torch.from_numpy(grid.cells), torch.from_numpy(grid.positions))
        words = cap.split()
        for j, colour in enumerate(words[:-1]):
            shape = words[j + 1]
            singular = shape.removesuffix("s")
            if (colour, singular) not in scenes.HELDOUT_PAIRS:
                continue
            before = " ".join(words[:j])
            true_ok += next_word(model, cells, f"{before} {colour}".strip()) == shape
            others = [
                c
                for c in scenes.COLOURS
                if c != colour and (c, singular) not in scenes.HELDOUT_PAIRS
            ][:3]
            hits = [next_word(model, cells, f"{before} {c}".strip()) == shape for c in others]
            seen_ok += sum(hits) / len(hits)
            n += 1
            break
    return {"pairs": n, "true_colour": true_ok / max(1, n), "seen_colour": seen_ok / max(1, n)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", nargs="+", default=["rawcast-tiny"])
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# bench/caption_probe.py on {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {args.scenes} held-out scenes"
    )
    print("| checkpoint | held-out pairs | shape right after the true colour | after a seen one |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for name in args.model:
            model = loader.load(name)
            model.eval()
            r = probe(model, args.scenes)
            print(
                f"| {name} | {r['pairs']:.0f} | {100 * r['true_colour']:.0f} % | "
                f"{100 * r['seen_colour']:.0f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
