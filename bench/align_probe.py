"""Does a checkpoint's decoder look at the audio? Attention mass on each token's word.

For held-out clips (``rawcast eval``'s eval shards, word end times included), each clip
is laid out as in training (prompt, audio, transcribe branch, reference transcript) and
one teacher-forced forward reads, per layer and head, the attention that each position
predicting a transcript token puts on the frames of that token's word (the windows of
``rawcast train --align-weight``, ``model/recipe/align.py``). Printed: the mean
``-log`` mass (the training loss) and its geometric-mean mass, per layer over all heads
and over the first two (the heads ``--align-heads 2`` guides), beside the same under
uniform attention over the visible tokens (what a head that reads nothing in
particular would score).

    python bench/align_probe.py --model rawcast-tiny --clips 64
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import torch

from rawcast.model import loader
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import align as A
from rawcast.model.recipe import train as T
from rawcast.model.recipe.evaluate import heldout_clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rawcast-tiny")
    ap.add_argument("--data-dir", type=Path, default=Path("data/rawcast-tiny"))
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = loader.load(args.model).eval()
    assert model.tokenizer is not None
    fmt = PromptFormat(model.tokenizer)
    examples = []
    for meta, audio, ends in heldout_clips(args.data_dir, args.clips):
        ex = T.speech_example(fmt, audio, meta["text"], "transcribe", None, ends)
        if ex.align:
            examples.append(ex)
    n_layers = len(model.layers)
    sums = {(i, h): 0.0 for i in range(n_layers) for h in (2, 0)}
    uniform = 0.0
    batches = 0
    for b0 in range(0, len(examples), args.batch):
        batch = examples[b0 : b0 + args.batch]
        p, _ = T.pack_batch(model, batch)
        targets = T.align_targets(p, batch)
        assert targets is not None
        uniform += float(A.uniform_loss(model._masks(p, None)[False], targets))
        n_heads = model.cfg.text.num_attention_heads
        for heads in (2, n_heads):
            aligner = T.Aligner(set(range(n_layers)), heads, targets)
            with torch.no_grad():
                T.hidden_states(model, p, 0, align=aligner)
            for i, loss in enumerate(aligner.losses):
                sums[(i, 2 if heads == 2 else 0)] += float(loss)
        batches += 1
    print(
        f"# {platform.machine()}, torch {torch.__version__}; {args.model}; "
        f"{len(examples)} held-out clips"
    )
    u = uniform / batches
    print(f"# uniform attention (full layers): -log mass {u:.2f}, mass {math.exp(-u):.1%}")
    print("layer  -log mass (all heads)  mass  |  -log mass (heads 0-1)  mass")
    for i in range(n_layers):
        all_h, two = sums[(i, 0)] / batches, sums[(i, 2)] / batches
        print(
            f"{i:5d}  {all_h:21.2f}  {math.exp(-all_h):6.1%}  |  {two:21.2f}  {math.exp(-two):6.1%}"
        )


if __name__ == "__main__":
    main()
