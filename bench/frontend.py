"""Audio front ends for rawcast-tiny, compared as phone recognisers (a recipe diagnostic).

The shipped model hears raw 640-sample frames through RMSNorm -> Linear (the Gemma 4
Unified audio embedder); the recipe starts that Linear, and the first MLP, as a
spectrogram. This bench asks how much the front end limits recognition on voices the
model never heard, apart from the rest of the recipe: the audio embedder and the first
three decoder layers of the rawcast-tiny shape learn CTC phone targets (the recipe's
own lexicon and data) for a fixed number of steps, then greedy CTC phone error rate
(PER, jiwer over phones) is scored on the held-out voices and on as many training clips.

Variants (all other things equal: data order, steps, schedule, layers):

- ``shipped``: the recipe's ``init_model`` (Hann-windowed 40 ms Fourier rows on a
  mel-like grid; the first MLP squares them into band energies in the same dims).
- ``subwindow``: ``init_model(..., "subwindow")`` (``rawcast train --frontend
  subwindow``): three overlapping 20 ms Hann windows per frame, 28 mel-spaced bands
  each (cos, sin), and the first MLP writing each window's band energies into dims of
  their own (a 3-step spectrogram kept apart from the raw Fourier values).
- ``subwindow-zero``: ``subwindow`` with every residual branch but the first MLP
  starting at zero (``train.zero_branches``): at a random init each branch adds a
  random vector of RMS 1 to a residual whose embedded frame has RMS about 0.2, which
  buries the spectrogram the first MLP computes.
- ``logmel``: a reference that the architecture cannot ship: 80 log-mel energies of
  each frame computed outside the model, through a learned Linear into the layers.

    python bench/frontend.py --data-dir data/rawcast-tiny --steps 1500 --variants shipped
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rawcast.model.gemma4 import DecoderLayer, Gemma4Unified
from rawcast.model.recipe import data as D
from rawcast.model.recipe import train as T
from rawcast.model.recipe.config import tiny_config

VARIANTS = ("shipped", "subwindow", "subwindow-zero", "logmel")
LAYERS = 3  # the recipe taps its CTC loss after layer 2


class LogMel(nn.Module):
    """80 log-mel energies of a 640-sample frame (Hann, one FFT) -> Linear(hidden)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        freqs = np.fft.rfftfreq(T.FRAME, 1 / T.RATE)
        edges = T.mel_grid(82, 0, 8000)
        fb = np.zeros((80, freqs.size))
        for i in range(80):
            lo, c, hi = edges[i : i + 3]
            fb[i] = np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0, None)
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32))
        self.register_buffer("win", torch.hann_window(T.FRAME))
        self.proj = nn.Linear(80, hidden)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        power = torch.fft.rfft(frames * self.win).abs() ** 2
        lm = torch.log(power @ self.fb.T + 1e-6)
        return self.proj((lm - lm.mean(-1, keepdim=True)) / 4)


class PhoneNet(nn.Module):
    """The rawcast-tiny shape cut to its first ``LAYERS`` layers, with a CTC head."""

    def __init__(self, variant: str, phones: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        model = Gemma4Unified(tiny_config(3000))
        T.init_model(model, seed, "subwindow" if variant.startswith("subwindow") else "fourier")
        if variant == "subwindow-zero":
            T.zero_branches(model)
        assert model.audio is not None
        model.layers = nn.ModuleList(model.layers[:LAYERS])
        self.model = model
        self.embed: nn.Module = LogMel(256) if variant == "logmel" else model.audio
        self.head = nn.Linear(256, phones + 1)

    def forward(self, clips: list[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """Log-probs (T, B, phones + 1) for CTC and each clip's frame count."""
        lens = [c.shape[0] for c in clips]
        tm = max(lens)
        x = torch.stack(
            [F.pad(self.embed(torch.from_numpy(c)), (0, 0, 0, tm - c.shape[0])) for c in clips]
        )
        pos = torch.arange(tm).expand(len(clips), tm)
        ones = torch.ones(tm, tm, dtype=torch.bool)
        mask = ones.tril() & ~ones.tril(-self.model.cfg.text.sliding_window)
        x, _ = self.model.run_layers(x, pos, {True: mask, False: mask}, None)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return F.log_softmax(self.head(x), -1).transpose(0, 1), lens


def train(
    net: PhoneNet,
    corpus: T.Corpus,
    lex: T.Lexicon,
    steps: int,
    batch: int,
    augment: float = 0.0,
    voice_shift: float = 0.0,
) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        rng = np.random.default_rng([1234, 7, step])
        clips: list[np.ndarray] = []
        targets: list[int] = []
        tlens: list[int] = []
        while len(clips) < batch:
            shard, i = corpus.sample(rng)
            lab = lex.labels(shard.meta[i]["text"])
            if lab:
                audio = shard.clip_audio(i)
                if augment or voice_shift:  # streams of their own: the data order stays
                    rng_a = np.random.default_rng([1234, 11, step, len(clips)])
                    audio = T.voice_shift(audio, rng_a, voice_shift)
                    audio = T.channel_augment(audio, rng_a, augment)
                clips.append(T.frames(audio))
                targets += lab
                tlens.append(len(lab))
        lr = 2e-3 * min(1.0, (step + 1) / 100) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        logp, lens = net(clips)
        loss = F.ctc_loss(
            logp, torch.tensor(targets), torch.tensor(lens), torch.tensor(tlens), zero_infinity=True
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 250 == 0:
            print(f"  step {step} ctc {float(loss.detach()):.3f}", flush=True)


@torch.no_grad()
def per(net: PhoneNet, clips: list[tuple[np.ndarray, list[str], str]], inv: dict[int, str]) -> Any:
    import jiwer

    by: dict[str, tuple[list[str], list[str]]] = {}
    for audio, ref, group in clips:
        logp, _ = net([T.frames(audio)])
        ids = logp[:, 0].argmax(-1).tolist()
        hyp = [inv[a] for j, a in enumerate(ids) if a and (j == 0 or ids[j - 1] != a)]
        refs, hyps = by.setdefault(group, ([], []))
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp) or "-")
    every = ([r for v in by.values() for r in v[0]], [h for v in by.values() for h in v[1]])
    return 100 * jiwer.wer(*every), {g: 100 * jiwer.wer(*v) for g, v in sorted(by.items())}


@torch.no_grad()
def init_spectrogram_corr(net: PhoneNet, audio: np.ndarray) -> float:
    """At init, how well the residual after layer 0 (its attention included) keeps the
    spectrogram the first MLP computes from the embedded frame alone: the correlation of
    the two's log band energies over a clip's frames, on the dims that MLP writes."""
    model = net.model
    assert model.audio is not None
    mlp0 = model.layers[0]
    assert isinstance(mlp0, DecoderLayer)
    x0 = model.audio(torch.from_numpy(T.frames(audio)))
    clean = mlp0.mlp(mlp0.pre_feedforward_layernorm(x0))
    live = clean.abs().amax(0) > 0  # the band-energy dims (the MLP writes nothing else)
    n = x0.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    layers = model.layers
    model.layers = nn.ModuleList(layers[:1])
    try:
        y, _ = model.run_layers(x0[None], torch.arange(n)[None], {True: mask, False: mask}, None)
    finally:
        model.layers = layers
    a = torch.log(y[0][:, live].flatten().clamp(min=1e-6))
    b = torch.log(clean[:, live].flatten().clamp(min=1e-6))
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=Path("data/rawcast-tiny"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--augment", type=float, default=0.0, help="share of clips through a random channel"
    )
    ap.add_argument(
        "--voice-shift", type=float, default=0.0, help="share of clips resampled 0.82-1.22x"
    )
    ap.add_argument(
        "--init-probe",
        action="store_true",
        help="print, per variant, how well layer 0 keeps the spectrogram at init (the "
        "first held-out clip), and train nothing",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = T.Corpus(args.data_dir)
    if len(corpus) == 0:
        raise SystemExit(f"no training shards under {args.data_dir}: run `rawcast train` first")
    lex = corpus.lexicon()
    held = [D.load_shard(p) for p in D.shards(args.data_dir, "eval")]
    words = sorted({w for s in held for m in s.meta for w in m["text"].split()})
    held_lex = T.phonemize(words)
    held_clips = [
        (s.clip_audio(i), [p for w in s.meta[i]["text"].split() for p in held_lex[w]],
         s.meta[i]["voice"])
        for s in held for i in range(len(s))
    ]  # fmt: skip
    rng = np.random.default_rng(99)
    seen_clips = []
    for _ in range(len(held_clips)):
        shard, i = corpus.sample(rng)
        text = shard.meta[i]["text"]
        seen_clips.append(
            (shard.clip_audio(i), [p for w in text.split() for p in lex.words[w]], "seen")
        )
    inv = {i: p for p, i in lex.index.items()}
    if args.init_probe:
        for variant in args.variants:
            if variant.startswith("subwindow"):
                corr = init_spectrogram_corr(
                    PhoneNet(variant, len(lex.phones), 1234), held[0].clip_audio(0)
                )
                print(f"{variant}: log band energies after layer 0 vs the first MLP's alone, "
                      f"correlation {corr:.2f} at init")  # fmt: skip
        return
    print(
        f"# bench/frontend.py on {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), torch {torch.__version__}, {args.steps} steps of "
        f"{args.batch} clips, {len(held_clips)} held-out and {len(seen_clips)} training clips"
    )
    for n, variant in enumerate(args.variants):
        t0 = time.time()
        net = PhoneNet(variant, len(lex.phones), seed=1234)
        train(net, corpus, lex, args.steps, args.batch, args.augment, args.voice_shift)
        held_per, voices = per(net, held_clips, inv)
        seen_per, _ = per(net, seen_clips, inv)
        cols = " | ".join(f"{v:.1f}" for v in voices.values())
        name = variant + (f" + channel {args.augment:g}" if args.augment else "")
        name += f" + voice shift {args.voice_shift:g}" if args.voice_shift else ""
        if n == 0:
            print(f"| front end | held-out PER | seen PER | {' | '.join(voices)} | time |")
            print("|---" * (len(voices) + 4) + "|")
        print(
            f"| {name} | {held_per:.1f} % | {seen_per:.1f} % | {cols} | "
            f"{(time.time() - t0) / 60:.1f} min |",
            flush=True,
        )


if __name__ == "__main__":
    main()
