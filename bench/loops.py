"""How often a checkpoint's greedy decodes loop, and what the loop stop does to WER and chrF.

Each held-out clip (``rawcast eval``'s) is transcribed and translated once by plain
greedy decoding (``loop_rule=None``) up to ``--max-new`` tokens. The loop stop keeps
a prefix of that output (``model/loops.py``), so its output is read off the same
tokens: the first prefix at which ``loop_cut`` fires, cut. Printed: the decodes it
stops, the tokens it saves, and WER / chrF with and without it, on the same decodes.

    python bench/loops.py --model rawcast-tiny
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from rawcast.model import loader
from rawcast.model.loops import LOOP_RULE, loop_cut
from rawcast.model.recipe import decode
from rawcast.model.recipe.evaluate import chrf, heldout_clips, wer


def guarded(tokens: list[int]) -> list[int]:
    """What the loop stop keeps of a plain greedy decode: the engine checks after each
    token, so the first prefix that ends in a loop decides."""
    for k in range(1, len(tokens) + 1):
        cut = loop_cut(tokens[:k], LOOP_RULE)
        if cut is not None:
            return tokens[:cut]
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="rawcast-tiny")
    ap.add_argument("--data-dir", type=Path, default=Path("data/rawcast-tiny"))
    ap.add_argument("--max-clips", type=int, default=None)
    ap.add_argument("--max-new", type=int, default=48, help="the engine's max_new_tokens")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = loader.load(args.model)
    assert model.tokenizer is not None
    tok = model.tokenizer
    rows: dict[str, dict[str, list[str]]] = {}
    stopped = {"transcribe": 0, "translate": 0}
    saved = {"transcribe": 0, "translate": 0}
    decodes = {"transcribe": 0, "translate": 0}
    examples: list[tuple[str, str]] = []
    for meta, audio, _ in heldout_clips(args.data_dir, args.max_clips):
        for task, ref in (("transcribe", meta["text"]), ("translate", meta["es"])):
            if not ref:
                continue
            plain = decode.greedy(model, task, audio=audio, max_new=args.max_new, loop_rule=None)
            cut = guarded(plain)
            decodes[task] += 1
            if len(cut) < len(plain):
                stopped[task] += 1
                saved[task] += len(plain) - len(cut)
                if len(examples) < 4:
                    examples.append((tok.decode(plain).strip(), tok.decode(cut).strip()))
            r = rows.setdefault(task, {"ref": [], "plain": [], "cut": []})
            r["ref"].append(ref)
            r["plain"].append(tok.decode(plain).strip())
            r["cut"].append(tok.decode(cut).strip())
    print(
        f"# bench/loops.py on {platform.processor() or platform.machine()}, {args.model}, "
        f"{decodes['transcribe']} held-out clips, max_new {args.max_new}, torch {torch.__version__}"
    )
    print("| task | decodes stopped | tokens saved | plain greedy | with the loop stop |")
    print("|---|---|---|---|---|")
    for task, score, unit in (("transcribe", wer, "WER %"), ("translate", chrf, "chrF")):
        if task not in rows:
            continue
        r = rows[task]
        a, b = score(r["ref"], r["plain"]), score(r["ref"], r["cut"])
        scale = 100.0 if unit == "WER %" else 1.0
        print(
            f"| {task} | {stopped[task]} of {decodes[task]} | {saved[task]} | "
            f"{unit} {a * scale:.1f} | {unit} {b * scale:.1f} |"
        )
    for plain_text, cut_text in examples:
        print(f"  plain: {plain_text!r}\n  stop:  {cut_text!r}")


if __name__ == "__main__":
    main()
