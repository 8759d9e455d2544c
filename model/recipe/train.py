"""Training rawcast-tiny: examples in the streaming prompt format, one loop, resumable.

Design decisions:

- Every example is laid out exactly as the engine will see it (``PromptFormat``):
  ``stream_prefix`` + audio placeholders (+ an image block) + ``branch(task)`` +
  target + ``<turn|>``; the loss covers the target and the closing ``<turn|>`` only.
- Tasks: transcribe (a share on audio cut mid-utterance, whose target is the words
  fully spoken before the cut), translate into Spanish, caption a rendered scene.
- Training tricks that leave the shipped architecture unchanged: the 640 -> hidden
  audio projection starts as a Hann-windowed Fourier basis on a mel-like frequency
  grid, and the first MLP as the band energies of it (a spectrogram at init); an
  auxiliary CTC loss on the audio positions of a middle layer, through a head that
  exists only during training; and a vision loss of the same kind: per image cell,
  the colour and shape of the object centred there (``scenes.cell_labels``), read
  from the same middle layer by a training-only head. A caption names shapes and
  counts them, and with the caption loss alone the model learned colours but
  guessed shapes and counts (0 % exact captions); the cell labels say where each
  object is and what it is.
- CTC targets are phones (espeak-ng's en-us IPA of each word, cached in the data
  directory as ``lexicon.json``), not letters: at 25 frames a second, letters need
  a label on about half of all frames and English spelling is not what the audio
  says; with letters the CTC loss stayed at its unigram plateau for 4000 steps,
  with phones it leaves the plateau within a few hundred.
- The training forward (``hidden_states``) is the backbone's own ``forward_packed``
  without a cache, restated to expose a middle layer and to project only the
  positions that carry a loss (tests check it equals ``forward_packed``).
- Resumable: ``state.pt`` holds model, heads, optimizer and step; batches are a
  pure function of (seed, step), so a resumed run sees the batches it would have
  seen. The shipped checkpoint is exported every ``export_every`` steps.
- ``init_from``: a new run may start from another run's weights (its ``state.pt``:
  model and heads) or from an exported checkpoint (model only), with a fresh
  optimizer and schedule: a second phase with another task mix.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from rawcast.model.gemma4 import (
    Append,
    DecoderLayer,
    Gemma4Unified,
    Packed,
    rms_norm,
    rope_cos_sin,
    softcap,
)
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import align as A
from rawcast.model.recipe import data as D
from rawcast.model.recipe import scenes, speech, warp
from rawcast.model.recipe.average import TailAverage
from rawcast.model.recipe.config import TOKEN_IDS, tiny_config
from rawcast.model.recipe.prefetch import Prefetcher
from rawcast.model.recipe.replicas import Replicas, launch
from rawcast.model.tokenizer import Tokenizer

FRAME = 640
RATE = 16_000
FRONTENDS = ("fourier", "subwindow")  # audio inits; fourier made the shipped checkpoint
PRECISIONS = ("fp32", "bf16")  # bf16: autocast matmuls, fp32 master weights and optimizer
LANGUAGE = "Spanish"
CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'"  # CTC labels 1..28; 0 is the blank


def ctc_labels(text: str) -> list[int]:
    return [CTC_CHARS.index(c) + 1 for c in text if c in CTC_CHARS]


def phone_units(ipa: str) -> list[str]:
    """espeak-ng IPA -> phones: stress dropped, tied diphthongs and long vowels one unit."""
    out: list[str] = []
    join = False
    for ch in ipa:
        if ch in "ˈˌ_- \t":
            join = False
            continue
        if ch == "\u200d":
            join = True
            continue
        if (join or ch in "ː\u0329") and out:
            out[-1] += ch
        else:
            out.append(ch)
        join = False
    return out


def phonemize(words: Sequence[str], voice: str = "en-us") -> dict[str, list[str]]:
    """espeak-ng's phones of each word (one word a line in, one line out)."""
    import subprocess

    res = subprocess.run(
        ["espeak-ng", "-q", "--ipa=3", "-v", voice],
        input="\n".join(words) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    lines = res.stdout.splitlines()
    if len(lines) != len(words):
        raise RuntimeError(f"espeak-ng gave {len(lines)} lines for {len(words)} words")
    return {w: phone_units(line.strip()) for w, line in zip(words, lines, strict=True)}


@dataclass(frozen=True)
class Lexicon:
    """Phone CTC targets: word -> phones (espeak-ng, en-us); labels 1..len(phones), 0 blank."""

    words: dict[str, list[str]]
    phones: tuple[str, ...]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index.update({p: i + 1 for i, p in enumerate(self.phones)})

    @staticmethod
    def build(root: Path, texts: Sequence[str]) -> Lexicon:
        """Cached in ``root/lexicon.json`` (a pure function of the training texts)."""
        f = root / "lexicon.json"
        vocab = sorted({w for t in texts for w in t.split()})
        words: dict[str, list[str]] = {}
        if f.exists():
            words = json.loads(f.read_text())
        missing = [w for w in vocab if w not in words]
        if missing:
            words.update(phonemize(missing))
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(words, ensure_ascii=False, sort_keys=True))
            tmp.replace(f)
        phones = tuple(sorted({p for w in vocab for p in words[w]}))
        return Lexicon({w: words[w] for w in vocab}, phones)

    def labels(self, text: str) -> list[int]:
        """Phone labels of ``text``; empty if a word is unknown (no CTC on that clip)."""
        out: list[int] = []
        for w in text.split():
            if w not in self.words:
                return []
            out += [self.index[p] for p in self.words[w] if p in self.index]
        return out


class RunError(ValueError):
    """A run that cannot start as asked (the CLI prints it in one line and exits 2)."""


MAX_CHECKPOINT_MB = 40  # the bound on rawcast-tiny's size on disk


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    batch: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ctc_weight: float = 1.0
    ctc_layer: int = 2
    ctc_targets: str = "phones"  # phones (espeak-ng, en-us) or chars
    frontend: str = "fourier"  # audio init: fourier (the shipped checkpoint's) or subwindow
    precision: str = "fp32"  # or bf16 (autocast; weights, grads and AdamW stay fp32)
    task_mix: tuple[float, float, float] = (0.6, 0.2, 0.2)  # transcribe, translate, caption
    truncate_share: float = 0.3
    layers: int = 4
    hidden: int = 256
    intermediate: int = 512
    export_every: int = 200
    max_minutes: float = 70.0
    seed: int = 1234
    threads: int = 1  # 0: torch's default
    vision_weight: float = 0.5  # the training-only per-cell colour/shape loss
    voice_shift: float = 0.0  # share of speech examples resampled as a shorter/longer voice
    voice_warp: float = 0.0  # share of speech examples with their formants moved (warp.py)
    channel: float = 0.0  # share of speech examples through a random channel (channel_augment)
    caption_corrupt: float = 0.0  # share of caption colour words fed as another colour
    count_weight: float = 0.0  # the training-only per-cell group-count loss (0: no count head)
    align_weight: float = 0.0  # the training-only guided-attention loss (align.py; 0: off)
    align_layers: tuple[int, ...] = (-1,)  # the layers it guides (-1: the last)
    align_heads: int = 2  # the first N query heads of each guided layer
    init_from: str = ""  # a run dir (state.pt) or checkpoint dir to start a new run from
    draw_from: int = 0  # step k trains on the batch of step draw_from + k (fresh data)
    mixed: float = 0.0  # share of examples with the other modality in the segment (a call)
    mixed_align: bool = True  # their transcriptions keep the guided-alignment windows
    average_last: int = 0  # the last step's export: the mean of the last N saves (average.py)


@dataclass
class Example:
    tokens: list[int]
    loss_from: int  # index of the first target token in ``tokens``
    inputs: list[int] | None = None  # what the model reads, where it differs from ``tokens``
    audio: npt.NDArray[np.float32] | None = None  # (n, 640)
    image: tuple[torch.Tensor, torch.Tensor] | None = None
    ctc: list[int] = field(default_factory=list)
    task: str = "transcribe"
    cell_labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
    # Frame window [lo, hi) of each target token's word (guided alignment), or empty.
    align: list[tuple[int, int]] = field(default_factory=list)
    audio_at: int = 0  # position of the first audio frame in ``tokens``
    # (frame, length): an image block of ``length`` positions sits before that audio
    # frame (``with_image``); (0, 0) when the audio is contiguous.
    image_gap: tuple[int, int] = (0, 0)


def frames(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Zero-pad to a multiple of 640 samples and reshape to (n, 640)."""
    pad = (-audio.size) % FRAME
    return np.pad(audio, (0, pad)).reshape(-1, FRAME).astype(np.float32)


def speech_example(
    fmt: PromptFormat,
    audio: npt.NDArray[np.float32],
    target: str,
    task: str,
    lex: Lexicon | None = None,
    ends: Sequence[int] | None = None,
) -> Example:
    """``ends``: the sample where each word of ``target`` ends (transcription only), for
    the guided-alignment windows."""
    tok = fmt.tok
    fr = frames(audio)
    prefix = fmt.stream_prefix()
    head = [*prefix, *([tok.ids.audio] * fr.shape[0])]
    head += fmt.branch(task, LANGUAGE if task == "translate" else None)
    body = tok.encode(target) if target else []
    wins = []
    if ends is not None and task == "transcribe" and body:
        wins = A.token_windows(tok.encode, target, ends, fr.shape[0])
        wins = wins if len(wins) == len(body) else []
    return Example(
        tokens=[*head, *body, tok.turn_close],
        loss_from=len(head),
        audio=fr,
        ctc=(lex.labels(target) if lex else ctc_labels(target)) if task == "transcribe" else [],
        task=task,
        align=wins,
        audio_at=len(prefix),
    )


def truncated(
    audio: npt.NDArray[np.float32], text: str, ends: Sequence[int], rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], str]:
    """Audio cut at a random point and the words fully spoken before the cut."""
    words = text.split()
    lo = max(FRAME, int(ends[0] * 0.6)) if ends else FRAME
    cut = int(rng.integers(lo, max(lo + 1, audio.size)))
    kept = [w for w, e in zip(words, ends, strict=False) if e <= cut - 800]
    return audio[:cut], " ".join(kept)


# Soft tokens per picture in training: a 384-px scene is 8x8 cells, one per 48-px cell.
IMAGE_BUDGET = 70


def colour_ids(fmt: PromptFormat) -> list[int]:
    """The token of each scene colour word after a space (each is one token in the
    recipe's tokenizer; a colour that is not is left out)."""
    out = []
    for c in scenes.COLOURS:
        ids = fmt.tok.encode(f"a {c}")
        if len(ids) == 2 and fmt.tok.decode(ids[1:]).strip() == c:
            out.append(ids[1])
    return out


def corrupt_colours(
    body: list[int], colours: Sequence[int], rng: np.random.Generator, share: float
) -> list[int]:
    """``body`` with each colour token swapped, with probability ``share``, for another
    colour: the input the model reads while its targets stay the true caption. The
    shape word after a colour is then learned from the picture, not from the colour
    word (which is what kept held-out pairs such as "red star" from ever being said:
    with a seen colour swapped in, the shipped checkpoint named the held-out shape
    right three times in four, with the true colour once in fifteen)."""
    out = list(body)
    for j, t in enumerate(out):
        if t in colours and rng.random() < share:
            out[j] = int(rng.choice([c for c in colours if c != t]))
    return out


def caption_noise(rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """The faint noise a caption example's prompt carries after the picture (half of
    them none), drawn from the batch's stream."""
    n_after = int(rng.integers(0, 20)) if rng.random() < 0.5 else 0
    return (rng.standard_normal(n_after * FRAME) * 10 ** rng.uniform(-4, -2)).astype(np.float32)


def caption_example(
    fmt: PromptFormat, seed: int, index: int, rng: np.random.Generator, corrupt: float = 0.0
) -> Example:
    from rawcast.pipeline.vision import patch_image

    noise = caption_noise(rng)
    n_after = noise.size // FRAME
    img, cap, labels = scenes.labelled_scene(seed, index)
    grid = patch_image(img, max_soft_tokens=IMAGE_BUDGET)
    tok = fmt.tok
    head = [*fmt.stream_prefix(), *fmt.image_block(grid.num_cells)]
    head += [tok.ids.audio] * n_after + fmt.branch("caption")
    body = tok.encode(cap)
    cells = torch.from_numpy(grid.cells)
    pos = torch.from_numpy(grid.positions)
    inputs = None
    if corrupt > 0:  # its own stream: the batches of a run without it stay put
        rng_c = np.random.default_rng([seed, 13, index])
        noisy = corrupt_colours(body, colour_ids(fmt), rng_c, corrupt)
        inputs = [*head, *noisy, tok.turn_close] if noisy != body else None
    return Example(
        tokens=[*head, *body, tok.turn_close],
        loss_from=len(head),
        inputs=inputs,
        audio=frames(noise) if n_after else None,
        image=(cells, pos),
        task="caption",
        cell_labels=labels,
    )


class Corpus:
    """Training shards in memory, sampled by a (seed, step) generator. ``clips`` (the data
    config's ``train_clips``) bounds the shards it reads: a directory that also holds the
    shards of a larger config (a later phase's ``--train-clips``) does not change the
    draw of a run made with the smaller one. ``None`` reads every training shard."""

    def __init__(self, root: Path, clips: int | None = None) -> None:
        self.root = root
        self.limit = None if clips is None else -(-clips // D.SHARD)
        self.shards: list[D.Shard] = []
        self.names: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        for p in D.shards(self.root, "train"):
            if self.limit is not None and int(p.stem.rsplit("-", 1)[1]) >= self.limit:
                continue
            if p.name not in self.names:
                self.shards.append(D.load_shard(p))
                self.names.append(p.name)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def lexicon(self) -> Lexicon:
        return Lexicon.build(self.root, [m["text"] for s in self.shards for m in s.meta])

    def sample(self, rng: np.random.Generator, grammar_only: bool = False) -> tuple[D.Shard, int]:
        while True:
            s = self.shards[int(rng.integers(len(self.shards)))]
            i = int(rng.integers(len(s)))
            if not grammar_only or s.meta[i]["source"] == "grammar" or rng.random() < 0.25:
                return s, i


def make_batch(
    fmt: PromptFormat,
    corpus: Corpus,
    cfg: TrainConfig,
    step: int,
    lex: Lexicon | None = None,
    part: tuple[int, int] = (0, 1),
) -> list[Example]:
    """Step ``step``'s batch: a function of the seed and the step only. ``part=(r, n)``
    makes only the examples ``b`` with ``b % n == r`` (a replica's share, ``--procs``),
    drawing the same random numbers for the others, so the shares of the n replicas
    are the single process's batch, example for example. ``cfg.draw_from`` shifts the
    draw: a phase that starts at ``draw_from = N`` sees the batches a run would see from
    its step N on, not the ones its predecessors already trained on."""
    step += cfg.draw_from
    rng = np.random.default_rng([cfg.seed, 7, step])
    out: list[Example] = []
    for b in range(cfg.batch):
        mine = b % part[1] == part[0]
        task = ("transcribe", "translate", "caption")[int(rng.choice(3, p=cfg.task_mix))]
        if task == "caption":
            index = step * cfg.batch + b
            if mine:
                ex = caption_example(fmt, cfg.seed, index, rng, cfg.caption_corrupt)
                rng_m = np.random.default_rng([cfg.seed, 19, step, b])
                if cfg.mixed > 0 and rng_m.random() < cfg.mixed:
                    shard, i = corpus.sample(rng_m)
                    speech = shard.clip_audio(i)
                    cut = int(rng_m.integers(FRAME, max(FRAME + 1, speech.size)))
                    ex = with_speech(fmt, ex, frames(speech[:cut]))
                out.append(ex)
            else:  # the draws it would have made, without the rendering
                caption_noise(rng)
            continue
        shard, i = corpus.sample(rng, grammar_only=task == "translate")
        audio = shard.clip_audio(i)
        meta = shard.meta[i]
        ends: list[int] | None = shard.clip_ends(i)
        if task == "translate":
            target = meta["es"]
        elif rng.random() < cfg.truncate_share:
            audio, target = truncated(audio, meta["text"], shard.clip_ends(i), rng)
        else:
            target = meta["text"]
        if not mine:  # what follows draws from streams of its own (or none)
            continue
        if cfg.voice_shift > 0:  # its own stream: the batches of a run without it stay put
            rng_b = np.random.default_rng([cfg.seed, 11, step, b])
            n = audio.size
            audio = voice_shift(audio, rng_b, cfg.voice_shift)
            ends = [e * audio.size // max(1, n) for e in ends] if ends else ends
        if cfg.voice_warp > 0:  # a stream of its own too; nothing moves in time
            audio = warp.voice_warp(audio, np.random.default_rng([cfg.seed, 17, step, b]),
                                    cfg.voice_warp)  # fmt: skip
        if cfg.channel > 0:  # a stream of its own; a linear filter and gaps: nothing moves
            audio = channel_augment(audio, np.random.default_rng([cfg.seed, 23, step, b]),
                                    cfg.channel)  # fmt: skip
        lex_t = lex if task == "transcribe" else None
        aligned = ends if cfg.align_weight > 0 else None
        ex = speech_example(fmt, audio, target, task, lex_t, aligned)
        rng_m = np.random.default_rng([cfg.seed, 19, step, b])
        if cfg.mixed > 0 and rng_m.random() < cfg.mixed:
            img, _, labels = scenes.labelled_scene(cfg.seed, MIXED_SCENES + step * cfg.batch + b)
            at = int(rng_m.integers(0, ex.audio.shape[0] + 1)) if ex.audio is not None else 0
            ex = with_image(fmt, ex, img, labels, at, keep_align=cfg.mixed_align)
        out.append(ex)
    return out


MIXED_SCENES = 1 << 40  # scene indices of the pictures that speech examples see


def with_image(
    fmt: PromptFormat,
    ex: Example,
    img: npt.NDArray[np.uint8],
    labels: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    at: int,
    keep_align: bool = True,
) -> Example:
    """A speech example with a camera frame's patch grid after its ``at``-th audio frame,
    as the engine appends a video frame that arrives mid-utterance: the target stays the
    transcript (or translation), and the guided-alignment windows skip the block
    (``image_gap``; ``keep_align=False`` drops them)."""
    from rawcast.pipeline.vision import patch_image

    grid = patch_image(img, max_soft_tokens=IMAGE_BUDGET)
    block = fmt.image_block(grid.num_cells)
    cut = ex.audio_at + at
    tokens = [*ex.tokens[:cut], *block, *ex.tokens[cut:]]
    return replace(
        ex,
        tokens=tokens,
        loss_from=ex.loss_from + len(block),
        image=(torch.from_numpy(grid.cells), torch.from_numpy(grid.positions)),
        cell_labels=labels,
        align=ex.align if keep_align else [],
        image_gap=(at, len(block)),
    )


def with_speech(fmt: PromptFormat, ex: Example, speech: npt.NDArray[np.float32]) -> Example:
    """A caption example whose segment held speech before the picture (someone talking
    when the video frame arrived): ``speech`` frames (n, 640) between the stream prefix and
    the image block. The target stays the caption."""
    at = len(fmt.stream_prefix())
    pad = [fmt.tok.ids.audio] * speech.shape[0]

    def put(tokens: list[int]) -> list[int]:
        return [*tokens[:at], *pad, *tokens[at:]]

    audio = speech if ex.audio is None else np.concatenate([speech, ex.audio])
    return replace(
        ex,
        tokens=put(ex.tokens),
        inputs=put(ex.inputs) if ex.inputs is not None else None,
        loss_from=ex.loss_from + len(pad),
        audio=audio,
        audio_at=at,
    )


VOICE_SHIFT = (0.82, 1.22)  # resampling factors: formants, pitch and tempo scale together


def voice_shift(
    audio: npt.NDArray[np.float32], rng: np.random.Generator, share: float
) -> npt.NDArray[np.float32]:
    """With probability ``share``, the clip resampled by a log-uniform factor
    in VOICE_SHIFT: every frequency (formants, as a shorter or longer vocal tract, and
    pitch) scales by it and the tempo by its inverse, so the words and their order stay.
    More voices than the synthesisers' few, made at training time from the stored clips."""
    if rng.random() >= share:
        return audio
    factor = float(np.exp(rng.uniform(*np.log(VOICE_SHIFT))))
    return speech.resample(audio, round(RATE * factor), RATE)


CHANNEL_EQ_DB = 6.0  # peak amplitude of each of the random EQ curve's cosines, in dB
CHANNEL_TILT_DB = 12.0  # the EQ's tilt from the lowest to the highest frequency, +/- dB
CHANNEL_BANDS = 2  # at most this many band-stop masks, each up to 1/8 of the mel axis
CHANNEL_GAPS = 2  # at most this many silenced spans, each 40-120 ms


def channel_augment(
    audio: npt.NDArray[np.float32], rng: np.random.Generator, share: float
) -> npt.NDArray[np.float32]:
    """With probability ``share``, the clip through a random channel: a smooth random EQ
    on a mel axis (a tilt plus a few cosines, as another synthesiser's or microphone's
    colouring), up to ``CHANNEL_BANDS`` notched bands (SpecAugment's frequency masks, done
    on the waveform) and up to ``CHANNEL_GAPS`` short silenced spans (its time masks).
    One linear filter over the whole clip, so timing and word ends stay; the RMS is kept
    (the embedder divides each frame's loudness out anyway)."""
    if rng.random() >= share or audio.size < 2:
        return audio
    spec = np.fft.rfft(audio.astype(np.float64))
    freqs = np.fft.rfftfreq(audio.size, 1.0 / RATE)
    m = np.log1p(freqs / 700.0) / np.log1p(RATE / 2 / 700.0)  # 0..1 on a mel axis
    db = rng.uniform(-1, 1) * CHANNEL_TILT_DB * (m - 0.5)
    for j in range(1, 5):
        db += rng.uniform(-1, 1) * CHANNEL_EQ_DB * np.cos(np.pi * j * m + rng.uniform(0, np.pi))
    for _ in range(int(rng.integers(0, CHANNEL_BANDS + 1))):
        lo = rng.uniform(0.05, 0.9)
        db[(m >= lo) & (m < lo + rng.uniform(0.02, 0.125))] -= 40.0
    y = np.fft.irfft(spec * 10 ** (db / 20), audio.size)
    for _ in range(int(rng.integers(0, CHANNEL_GAPS + 1))):
        n = int(rng.uniform(0.04, 0.12) * RATE)
        if audio.size > n:
            at = int(rng.integers(0, audio.size - n))
            y[at : at + n] = 0.0
    rms_in = float(np.sqrt((audio.astype(np.float64) ** 2).mean()))
    rms_out = float(np.sqrt((y**2).mean())) + 1e-12
    return np.clip(y * (rms_in / rms_out), -1.0, 1.0).astype(np.float32)


# --- model ---------------------------------------------------------------------------------


def mel_grid(k: int, lo: float, hi: float) -> npt.NDArray[np.float64]:
    mel = np.linspace(2595 * np.log10(1 + lo / 700), 2595 * np.log10(1 + hi / 700), k)
    return np.asarray(700 * (10 ** (mel / 2595) - 1))


def fourier_basis(out_dim: int, n: int = FRAME, rate: int = RATE) -> torch.Tensor:
    """(out_dim, n) Hann-windowed cos/sin rows on a mel-spaced grid, unit-norm rows."""
    k = out_dim // 2
    freqs = mel_grid(k, 60, 7600)
    t = np.arange(n) / rate
    win = np.hanning(n)
    rows = []
    for f in freqs:
        rows.append(win * np.cos(2 * np.pi * f * t))
        rows.append(win * np.sin(2 * np.pi * f * t))
    while len(rows) < out_dim:
        rows.append(win / np.sqrt(n))
    w = np.stack(rows[:out_dim])
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return torch.tensor(w, dtype=torch.float32)


def energy_mlp(layer: nn.Module) -> None:
    """First MLP as band energies of the Fourier features: |X_k|^2 into dims 2k and 2k+1.

    gelu(u) * u + gelu(-u) * (-u) = u^2 exactly (gelu(u) - gelu(-u) = u), so unit j
    and its negated twin give the square of hidden dim j; down sums cos and sin.
    """
    assert isinstance(layer, DecoderLayer)
    mlp = layer.mlp
    inter, hidden = mlp.gate_proj.weight.shape
    n = min(hidden, inter // 2)
    eye = torch.eye(hidden)[:n]
    gate = torch.zeros(inter, hidden)
    gate[:n] = eye
    gate[n : 2 * n] = -eye
    down = torch.zeros(hidden, inter)
    for j in range(n):
        for out in (j - j % 2, j - j % 2 + 1):
            if out < hidden:
                down[out, j] = down[out, n + j] = 1.0 / math.sqrt(2 * n)
    mlp.gate_proj.weight.copy_(gate)
    mlp.up_proj.weight.copy_(gate)
    mlp.down_proj.weight.copy_(down)


def subwindow_init(model: Gemma4Unified, windows: int = 3, n: int = 320, hop: int = 160) -> int:
    """The audio projection as a 3-step spectrogram, kept apart from its raw values.

    Rows (window, band, cos/sin) on ``n``-sample Hann windows ``hop`` apart, on a
    mel-like grid of as many bands as fit; the first MLP squares each row (see
    ``energy_mlp``) and sums cos and sin into dim ``raw + window * bands + band``, dims
    the raw rows leave empty. ``bench/frontend.py`` measured it against the Fourier init
    as a phone recogniser (README). Returns the number of bands.
    """
    layer = model.layers[0]
    assert isinstance(layer, DecoderLayer) and model.audio is not None
    inter, hidden = layer.mlp.gate_proj.weight.shape
    bands = min(hidden // (3 * windows), inter // (4 * windows))
    raw = 2 * windows * bands
    t = np.arange(n) / RATE
    rows = np.zeros((hidden, FRAME))
    j = 0
    for w in range(windows):
        for f in mel_grid(bands, 60, 7600):
            for fn in (np.cos, np.sin):
                rows[j, w * hop : w * hop + n] = np.hanning(n) * fn(2 * np.pi * f * t)
                rows[j] /= np.linalg.norm(rows[j])
                j += 1
    gate = torch.zeros(inter, hidden)
    down = torch.zeros(hidden, inter)
    for i in range(raw):
        gate[i, i], gate[raw + i, i] = 1.0, -1.0
        down[raw + i // 2, i] = down[raw + i // 2, raw + i] = 1.0
    with torch.no_grad():
        model.audio.embedding_projection.weight.copy_(torch.tensor(rows, dtype=torch.float32))
        layer.mlp.gate_proj.weight.copy_(gate)
        layer.mlp.up_proj.weight.copy_(gate)
        layer.mlp.down_proj.weight.copy_(down)
    return bands


def zero_branches(model: Gemma4Unified) -> None:
    """Every layer's attention and MLP branch starts at zero (its post-norm weight 0)
    except the first MLP, which carries the spectrogram of the audio init.

    Each branch's output is RMS-normalised before it joins the residual, so at a random
    init every branch adds a random vector of RMS 1, and the embedded frame is far smaller
    (RMS about 0.2): the first layer's attention alone buried the spectrogram the first
    MLP computes (log band energies after layer 0 against the first MLP's alone:
    correlation 0.16, and 0.99 with the branches at zero; ``bench/frontend.py
    --init-probe``). With the branches at zero the spectrogram passes through
    every layer as computed; each branch grows from zero as its norm weight learns
    (ReZero's and Fixup's zero-init residual branches)."""
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            assert isinstance(layer, DecoderLayer)
            layer.post_attention_layernorm.weight.zero_()
            if i > 0:
                layer.post_feedforward_layernorm.weight.zero_()


def init_model(model: Gemma4Unified, seed: int, frontend: str = "fourier") -> None:
    if frontend not in FRONTENDS:
        raise ValueError(f"unknown front end {frontend!r}: {', '.join(FRONTENDS)}")
    g = torch.Generator().manual_seed(seed)
    hidden = model.cfg.text.hidden_size
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0 / math.sqrt(hidden), generator=g)
        for name, p in model.named_parameters():
            if name.startswith("layers.") and p.dim() == 2:
                p.normal_(0.0, 0.5 / math.sqrt(p.shape[1]), generator=g)
        if model.audio is not None and frontend == "fourier":
            model.audio.embedding_projection.weight.copy_(fourier_basis(hidden))
            energy_mlp(model.layers[0])
        elif model.audio is not None:
            subwindow_init(model)
        if model.vision is not None:
            model.vision.pos_embedding.normal_(0.0, 0.02, generator=g)


def hidden_states(
    model: Gemma4Unified,
    p: Packed,
    tap: int,
    keep_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    align: Aligner | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-normed hidden (B, T, H) and the residual after layer ``tap``: no cache.

    Layers named in ``keep_kv`` get their (normed, rotated) K and V stored there: the
    drafter recipe trains on what the target's cache would hold. With ``align``, its
    layers' attention is scored against its windows (``align.losses``)."""
    x = model.embed(p)
    masks = model._masks(p, None)
    rope = {
        True: rope_cos_sin(p.positions, model.inv_freq_sliding, x.dtype),
        False: rope_cos_sin(p.positions, model.inv_freq_full, x.dtype),
    }
    mid = x
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        h = layer.input_layernorm(x)
        q, k, v = layer.self_attn.project(h, *rope[layer.sliding])
        if keep_kv is not None and i in keep_kv:
            keep_kv[i] = (k, v)
        if align is not None and i in align.layers:
            align.losses.append(A.loss(q, k, masks[layer.sliding], align.targets, align.heads))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=masks[layer.sliding], scale=1.0, enable_gqa=q.shape[1] != k.shape[1]
        )
        b, _, tt, _ = attn.shape
        attn = layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, tt, -1))
        x = x + layer.post_attention_layernorm(attn)
        x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        x = x * layer.layer_scalar
        if i == tap:
            mid = x
    return model.norm(x), mid


@dataclass
class Aligner:
    """The guided-alignment loss of one forward: which layers and heads, where."""

    layers: set[int]
    heads: int
    targets: A.Targets
    losses: list[torch.Tensor] = field(default_factory=list)

    @staticmethod
    def of(
        model: Gemma4Unified, p: Packed, batch: Sequence[Example], cfg: TrainConfig
    ) -> Aligner | None:
        if cfg.align_weight <= 0:
            return None
        n = len(model.layers)
        layers = {i % n for i in cfg.align_layers}
        targets = align_targets(p, batch)
        return Aligner(layers, cfg.align_heads, targets) if targets is not None else None


def align_targets(p: Packed, batch: Sequence[Example]) -> A.Targets | None:
    """The alignment windows of a packed batch: the position predicting target token j
    of row b is ``loss_from - 1 + j``; its word's frames start at ``audio_at``, less an
    image block amid them (``image_gap``)."""
    rows = {b: (ex.loss_from - 1, ex.audio_at, ex.align) for b, ex in enumerate(batch) if ex.align}
    gaps = {b: ex.image_gap for b, ex in enumerate(batch) if ex.image_gap[1]}
    width, device = p.input_ids.shape[1], p.input_ids.device
    return A.Targets.build(width, rows, len(batch), device, gaps)


def output_logits(model: Gemma4Unified, h: torch.Tensor) -> torch.Tensor:
    w = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return softcap(F.linear(h, w).float(), model.cfg.text.final_logit_softcapping)


def pack_batch(model: Gemma4Unified, batch: Sequence[Example]) -> tuple[Packed, torch.Tensor]:
    rows = []
    for i, ex in enumerate(batch):
        audio = torch.from_numpy(ex.audio) if ex.audio is not None else None
        rows.append(
            Append(
                slot=i,
                tokens=ex.tokens if ex.inputs is None else ex.inputs,
                audio=audio,
                images=[ex.image] if ex.image else [],
            )
        )
    width = max(len(ex.tokens) for ex in batch)
    width += (-width) % 8
    p = model.pack(rows, None, pad_to=width)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.tokens)
        labels[i, ex.loss_from - 1 : n - 1] = torch.tensor(ex.tokens[ex.loss_from : n])
    return p, labels.to(model.device)


VISION_CLASSES = (1 + len(scenes.COLOURS), 1 + len(scenes.SHAPES))


def vision_head(hidden: int) -> nn.Linear:
    """The training-only per-cell head: colour logits, then shape logits."""
    return nn.Linear(hidden, sum(VISION_CLASSES))


MAX_COUNT = 3  # scenes draw 1-3 shapes per group


def count_head(hidden: int) -> nn.Linear:
    """The training-only per-cell count head: how many shapes the group of the shape
    centred in the cell has (logits for 0..MAX_COUNT; 0 is never a target)."""
    return nn.Linear(hidden, MAX_COUNT + 1)


def count_labels(
    colour: npt.NDArray[np.int64], shape: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Per cell: the size of the group (same colour and shape) of the shape centred there,
    or 0 for a cell without one; read off ``scenes.cell_labels``."""
    out = np.zeros_like(shape)
    for c, s in {(int(c), int(s)) for c, s in zip(colour, shape, strict=True) if s > 0}:
        same = (colour == c) & (shape == s)
        out[same] = min(MAX_COUNT, int(same.sum()))
    return out


def _image_cells(
    model: Gemma4Unified, p: Packed, mid: torch.Tensor, batch: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The normalised middle-layer states at every labelled image position, with each
    cell's colour and shape classes, or None without labelled images."""
    states, colours, shapes = [], [], []
    for i, ex in enumerate(batch):
        if ex.cell_labels is None:
            continue
        pos = (p.input_ids[i] == model.cfg.tokens.image).nonzero().view(-1)
        states.append(mid[i, pos])
        colours.append(torch.from_numpy(ex.cell_labels[0]))
        shapes.append(torch.from_numpy(ex.cell_labels[1]))
    if not states:
        return None
    dev = mid.device
    x = rms_norm(torch.cat(states), None, 1e-6)
    return x, torch.cat(colours).to(dev), torch.cat(shapes).to(dev)


def count_loss(
    model: Gemma4Unified,
    head: nn.Linear,
    p: Packed,
    mid: torch.Tensor,
    batch: Sequence[Example],
) -> torch.Tensor | None:
    """Cross-entropy of each shape's group size (``count_labels``) over the cells a shape
    is centred in, from the middle layer, or None without labelled shapes: the captions'
    first word is a count, and it is what they miss most often."""
    cells = _image_cells(model, p, mid, batch)
    if cells is None:
        return None
    x, colour, shape = cells
    counts = torch.from_numpy(count_labels(colour.cpu().numpy(), shape.cpu().numpy()))
    held = shape > 0
    if not bool(held.any()):
        return None
    return F.cross_entropy(head(x[held]).float(), counts.to(x.device)[held])


def vision_loss(
    model: Gemma4Unified,
    head: nn.Linear,
    p: Packed,
    mid: torch.Tensor,
    batch: Sequence[Example],
) -> torch.Tensor | None:
    """Mean cross-entropy of each cell's colour class (0: empty) plus that of the shape
    class over the cells an object sits in (``scenes.cell_labels``), from the middle layer
    at the image positions, or None without labelled images."""
    cells = _image_cells(model, p, mid, batch)
    if cells is None:
        return None
    x, colour, shape = cells
    logits = head(x).float()
    n_colour = VISION_CLASSES[0]
    loss = F.cross_entropy(logits[:, :n_colour], colour)
    # Shape only where an object sits: over all cells the empty ones (most of them)
    # would dilute it to a few per cent of the loss, and shape is what the captions miss.
    held = shape > 0
    if bool(held.any()):
        loss = loss + F.cross_entropy(logits[held, n_colour:], shape[held])
    return loss


def losses(
    model: Gemma4Unified,
    head: nn.Linear,
    batch: Sequence[Example],
    cfg: TrainConfig,
    vhead: nn.Linear | None = None,
    chead: nn.Linear | None = None,
) -> dict[str, torch.Tensor]:
    """Cross-entropy on the targets, the auxiliary CTC loss, (with ``vhead``) the
    per-cell vision loss and (with ``chead``) the per-cell count loss; ``loss`` is their
    weighted sum."""
    p, labels = pack_batch(model, batch)
    aligner = Aligner.of(model, p, batch, cfg)
    h, mid = hidden_states(model, p, cfg.ctc_layer, align=aligner)
    sel = labels != -100
    logits = output_logits(model, h[sel])
    ce_all = F.cross_entropy(logits, labels[sel], reduction="none")
    out: dict[str, torch.Tensor] = {"ce": ce_all.mean()}
    row_of = torch.arange(len(batch), device=labels.device).view(-1, 1).expand_as(labels)[sel]
    for task in ("transcribe", "translate", "caption"):
        rows = torch.tensor([ex.task == task for ex in batch], device=labels.device)
        m = rows[row_of]
        if bool(m.any()):
            out[f"ce_{task}"] = ce_all[m].mean().detach()
    ctc_rows = [i for i, ex in enumerate(batch) if ex.ctc and ex.audio is not None]
    if ctc_rows and cfg.ctc_weight > 0:
        audio_id = model.cfg.tokens.audio
        seqs: list[torch.Tensor] = []
        in_lens: list[int] = []
        targets: list[int] = []
        tgt_lens: list[int] = []
        for i in ctc_rows:
            pos = (p.input_ids[i] == audio_id).nonzero().view(-1)
            seqs.append(mid[i, pos])
            in_lens.append(int(pos.numel()))
            targets.extend(batch[i].ctc)
            tgt_lens.append(len(batch[i].ctc))
        padded = nn.utils.rnn.pad_sequence(seqs)  # (T, N, H)
        logp = F.log_softmax(head(rms_norm(padded, None, 1e-6)).float(), dim=-1)
        ctc = F.ctc_loss(  # mean over the batch of the loss per target token
            logp,
            torch.tensor(targets, device=logp.device),
            torch.tensor(in_lens),
            torch.tensor(tgt_lens),
            blank=0,
            zero_infinity=True,
        )
        out["ctc"] = ctc
        out["loss"] = out["ce"] + cfg.ctc_weight * ctc
    else:
        out["loss"] = out["ce"]
    vis = vision_loss(model, vhead, p, mid, batch) if vhead is not None else None
    if vis is not None and cfg.vision_weight > 0:
        out["vision"] = vis
        out["loss"] = out["loss"] + cfg.vision_weight * vis
    count = count_loss(model, chead, p, mid, batch) if chead is not None else None
    if count is not None and cfg.count_weight > 0:
        out["count"] = count
        out["loss"] = out["loss"] + cfg.count_weight * count
    if aligner is not None and aligner.losses:
        out["align"] = torch.stack(aligner.losses).mean()
        out["loss"] = out["loss"] + cfg.align_weight * out["align"]
    return out


class Schedule(Protocol):
    """What ``lr_at`` reads (``TrainConfig`` and the drafter's config both have it)."""

    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def min_lr(self) -> float: ...
    @property
    def warmup(self) -> int: ...
    @property
    def max_minutes(self) -> float: ...
    @property
    def export_every(self) -> int: ...


def lr_at(step: int, cfg: Schedule, minutes: float = 0.0) -> float:
    """Warmup, then cosine decay over whichever runs out first: steps or the time budget."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), minutes / cfg.max_minutes)
    frac = min(1.0, frac)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def load_tokenizer(root: Path, dcfg: D.DataConfig) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    f = root / "tokenizer.json"
    if not f.exists():
        hf = D.train_tokenizer(D.load_sentences(root, dcfg), dcfg)
        tmp = root / "tokenizer.tmp.json"
        hf.save(str(tmp))
        tmp.replace(f)
    return Tokenizer(HFTokenizer.from_file(str(f)), TOKEN_IDS)


def publish(out: Path, write: Callable[[Path], Any]) -> None:
    """``write(dir)`` into a sibling temporary directory, then move its files into ``out``
    (a reader never sees a half-written checkpoint file)."""
    tmp = out.with_name(out.name + ".tmp")
    write(tmp)
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def export(model: Gemma4Unified, out: Path) -> None:
    from rawcast.model.loader import save

    publish(out, lambda tmp: save(model, tmp))


def adamw(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, scalars or biases)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )


class RunState:
    """A resumable run: ``run_dir/state.pt`` (named state dicts, the step, the training
    minutes spent, which count across resumed runs), ``log.jsonl``, a progress bar, the
    learning-rate schedule, periodic saves and the time budget."""

    def __init__(
        self,
        run_dir: Path,
        parts: dict[str, Any],
        cfg: Schedule,
        export: Callable[[], None],
        desc: str = "train",
        shown: Sequence[str] = ("loss",),
        log: Any = print,
        writer: bool = True,
    ) -> None:
        self.file = run_dir / "state.pt"
        self.writer = writer  # False: another replica's (``--procs``): counts steps only
        self.logfile = run_dir / "log.jsonl"
        self.parts = parts  # name -> module or optimizer (anything with state_dict())
        self.cfg = cfg
        self.export = export
        self.desc = desc
        self.shown = shown
        self.log = log
        self.step = 0
        self.spent = 0.0
        self.t0 = time.time()
        self.ema: dict[str, float] = {}
        self.bar: Any = None

    def resume(self, device: torch.device) -> None:
        if self.file.exists():
            st = torch.load(self.file, map_location=device, weights_only=False)
            missing = [name for name in self.parts if name not in st]
            if missing:
                raise RuntimeError(
                    f"{self.file} has no {', '.join(missing)} (a run of an older recipe): "
                    "start a new run directory with --init-from it"
                )
            for name, part in self.parts.items():
                part.load_state_dict(st[name])
            self.step, self.spent = int(st["step"]), float(st.get("minutes", 0.0))
            if self.writer:
                self.log(f"resumed from {self.file} at step {self.step}")
        self.t0 = time.time()
        if not self.writer:
            return
        tqdm = importlib.import_module("tqdm").tqdm  # untyped; imported here (an optional extra)
        self.bar = tqdm(
            total=self.cfg.steps, initial=self.step, desc=self.desc, dynamic_ncols=True,
            mininterval=5,
        )  # fmt: skip

    def minutes(self) -> float:
        return self.spent + (time.time() - self.t0) / 60

    def lr(self) -> float:
        return lr_at(self.step, self.cfg, self.minutes())

    def running(self) -> bool:
        return self.step < self.cfg.steps

    def save(self) -> None:
        tmp = self.file.with_name("state.tmp.pt")
        state = {name: part.state_dict() for name, part in self.parts.items()}
        torch.save({**state, "step": self.step, "minutes": self.minutes()}, tmp)
        tmp.replace(self.file)
        self.export()

    def save_due(self) -> bool:
        """Whether the step just counted saves and exports (every ``export_every`` and the
        last)."""
        return self.step % self.cfg.export_every == 0 or self.step == self.cfg.steps

    def record(self, vals: dict[str, float], **extra: float) -> bool:
        """After a step: count it, log it, save and export when due. False once the time
        budget is spent (the state is saved first)."""
        self.step += 1
        if not self.writer:
            return True
        for k, v in vals.items():
            self.ema[k] = v if k not in self.ema else 0.95 * self.ema[k] + 0.05 * v
        self.bar.update(1)
        self.bar.set_postfix({k: f"{self.ema[k]:.3f}" for k in self.shown if k in self.ema})
        rec = {"step": self.step, **extra, "min": self.minutes(), **vals}
        with self.logfile.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.save_due():
            self.save()
            self.log(f"step {self.step}: " + " ".join(f"{k}={v:.3f}" for k, v in self.ema.items()))
        if self.minutes() > self.cfg.max_minutes:
            self.log(f"time budget of {self.cfg.max_minutes} min reached at step {self.step}")
            self.save()
            return False
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def autocast(device: torch.device, precision: str) -> Any:
    """The forward's precision context: bf16 autocast (matmuls and attention in bf16 on
    AMX / tensor cores; the loss heads cast back to fp32) or nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Trainer:
    """What one training step needs: the model, the CTC head, the optimizer, the data."""

    cfg: TrainConfig
    device: torch.device
    fmt: PromptFormat
    model: Gemma4Unified
    head: nn.Linear
    vhead: nn.Linear
    params: list[nn.Parameter]
    opt: torch.optim.AdamW
    corpus: Corpus
    lex: Lexicon | None
    chead: nn.Linear | None = None  # only with ``count_weight`` (runs without it resume as before)
    replicas: Replicas | None = None  # ``--procs``: this process's share and the group

    def batch(self, step: int) -> list[Example]:
        if step % 100 == 0:
            self.corpus.refresh()
        rep = self.replicas
        part = (rep.rank, rep.world) if rep is not None else (0, 1)
        return make_batch(self.fmt, self.corpus, self.cfg, step, self.lex, part)

    def step(self, batch: Sequence[Example], lr: float) -> tuple[dict[str, float], float]:
        """One optimizer step at ``lr``: the losses and the gradient norm (before clipping)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        with autocast(self.device, self.cfg.precision):
            out = losses(self.model, self.head, batch, self.cfg, self.vhead, self.chead)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.replicas is not None:
            self.replicas.average_grads(self.params)
        gn = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return {k: float(v.detach()) for k, v in out.items()}, float(gn)


def run_tokenizer(
    data_root: Path, dcfg: D.DataConfig, run_dir: Path | None, init_from: str
) -> Tokenizer:
    """The tokenizer a run's embeddings go with: the run's own (a resumed run), else that
    of the run or checkpoint it starts from, else the data directory's (made there if
    missing). A regenerated data directory may hold another tokenizer: one made again
    from the same sentences gave the shipped checkpoint's 3000 tokens with 135 of them
    under other ids, which a second phase from that checkpoint would have read as
    other words."""
    for d in (run_dir, Path(init_from) if init_from else None):
        if d is not None and (d / "tokenizer.json").exists():
            return Tokenizer.from_file(d / "tokenizer.json", TOKEN_IDS)
    return load_tokenizer(data_root, dcfg)


def check(cfg: TrainConfig) -> None:
    """Refuse a config no run can start from (``RunError``: the CLI's one line)."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}: {', '.join(PRECISIONS)}")
    if not 0 <= cfg.ctc_layer < cfg.layers:
        raise RunError(f"the CTC layer ({cfg.ctc_layer}) must be below the layers ({cfg.layers})")
    bad = [i for i in cfg.align_layers if not -cfg.layers <= i < cfg.layers]
    if bad:
        raise RunError(f"--align-layers {bad[0]} is not a layer of a {cfg.layers}-layer model")


def build(
    data_root: Path,
    cfg: TrainConfig,
    dcfg: D.DataConfig,
    run_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Trainer:
    """A fresh model (the recipe's init), its CTC head and optimizer, over ``data_root``;
    the tokenizer is ``run_tokenizer``'s."""
    check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = run_tokenizer(data_root, dcfg, run_dir, cfg.init_from)
    mcfg = tiny_config(tok.vocab_size, cfg.layers, cfg.hidden, cfg.intermediate)
    torch.manual_seed(cfg.seed)
    model = Gemma4Unified(mcfg)
    init_model(model, cfg.seed, cfg.frontend)
    model.tokenizer = tok
    model.image_budget = IMAGE_BUDGET  # exported with it: the engine patches pictures so
    corpus = Corpus(data_root, dcfg.train_clips)
    if len(corpus) == 0:
        raise RuntimeError(f"no training shards under {data_root}: generate data first")
    lex = corpus.lexicon() if cfg.ctc_targets == "phones" else None
    labels = ctc_inventory(lex)
    head = nn.Linear(cfg.hidden, 1 + len(labels))
    vhead = vision_head(cfg.hidden)
    heads: dict[str, nn.Linear] = {"head": head, "vision_head": vhead}
    if cfg.count_weight > 0:
        heads["count_head"] = count_head(cfg.hidden)
    if cfg.init_from:
        for note in start_from(Path(cfg.init_from), model, dict(heads), labels):
            (log or _quiet)(note)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for h in heads.values():
        h.to(device)
        params += list(h.parameters())
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    fmt = PromptFormat(tok)
    chead = heads.get("count_head")
    return Trainer(cfg, device, fmt, model, head, vhead, params, opt, corpus, lex, chead)


CTC_LABELS = "ctc_labels.json"  # a run directory's CTC label inventory (phones or letters)


def ctc_inventory(lex: Lexicon | None) -> list[str]:
    """The CTC head's labels after the blank: the lexicon's phones, else the letters."""
    return list(lex.phones) if lex is not None else list(CTC_CHARS)


def start_from(
    src: Path,
    model: Gemma4Unified,
    heads: dict[str, nn.Module],
    labels: Sequence[str],
) -> list[str]:
    """Weights of another run (``src/state.pt``: the model and the heads it has) or of an
    exported checkpoint (the model only; the heads keep their fresh init) into a new
    run's modules. Shapes must match, except the CTC head's: a run over more data may
    label more phones (``labels``), and a head trained on another inventory starts
    afresh. Returns what it did not load, as lines to log."""
    from rawcast.model.loader import load

    notes: list[str] = []
    state = src / "state.pt"
    if state.exists():
        st = torch.load(state, map_location="cpu", weights_only=False)
        _load_same_shape(src, model, st["model"])
        for name, head in heads.items():
            if name == "head" and name in st:
                theirs, rows = _labels_of(src), st[name]["weight"].shape[0] - 1
                if (theirs != list(labels)) if theirs is not None else rows != len(labels):
                    notes.append(f"the CTC head starts afresh: {src} labelled {rows} phones or "
                                 f"letters, this run's data {len(labels)}")  # fmt: skip
                    continue
            if name in st:
                _load_same_shape(src, head, st[name])
    elif (src / "config.json").exists():
        _load_same_shape(src, model, load(src).state_dict())
    else:
        raise RunError(f"{src}: neither a run directory (state.pt) nor a checkpoint")
    return notes


def _labels_of(src: Path) -> list[str] | None:
    """The labels a run's CTC head was trained on: its ``ctc_labels.json`` (runs from
    before it: None, and the head is taken where its size matches)."""
    f = src / CTC_LABELS
    if f.exists():
        out: list[str] = json.loads(f.read_text())
        return out
    return None


def _load_same_shape(src: Path, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # size mismatches (or missing keys): another shape
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise RunError(
            f"{src} has another model shape than this run (--layers, --hidden, --intermediate "
            f"must match it): {first}"
        ) from e


LOGGED = ("loss", "ce", "ce_transcribe", "ce_translate", "ce_caption", "ctc", "vision", "count",
          "align")  # fmt: skip  # every value ``losses`` may return


def train(
    data_root: Path,
    run_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    dcfg: D.DataConfig,
    log: Any = print,
    procs: int = 1,
    prefetch: int = 0,
) -> Path:
    """Train (or resume) and export to ``out_dir``. Returns ``out_dir``. ``procs > 1``:
    that many CPU processes share each batch (``replicas``); the run, its state and its
    checkpoints are the same as one process's, so either may resume the other.
    ``prefetch``: batches made ahead on a background thread (``prefetch.Prefetcher``;
    0: each made when its step starts); the batches, hence the run, are the same."""
    if procs > 1:
        if torch.cuda.is_available():
            raise RunError("--procs splits batches over CPU processes: with a GPU leave it at 1")
        if cfg.batch % procs:
            raise RunError(f"--batch {cfg.batch} does not split into --procs {procs} equal shares")
        check(cfg)
        launch(procs, _train, data_root, run_dir, out_dir, cfg, dcfg, prefetch,
               leader={"log": log})  # fmt: skip
    else:
        _train(None, data_root, run_dir, out_dir, cfg, dcfg, prefetch, log)
    return out_dir


def _train(
    rep: Replicas | None,
    data_root: Path,
    run_dir: Path,
    out_dir: Path,
    cfg: TrainConfig,
    dcfg: D.DataConfig,
    prefetch: int = 0,
    log: Any = None,
) -> None:
    leader = rep is None or rep.leader
    if log is None or not leader:  # the other replicas stay quiet
        log = _quiet
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = build(data_root, cfg, dcfg, run_dir, log)
    tr.replicas = rep
    if leader and not (run_dir / "tokenizer.json").exists():
        tr.fmt.tok.save(run_dir / "tokenizer.json")
    labels = ctc_inventory(tr.lex)
    theirs = _labels_of(run_dir) if (run_dir / "state.pt").exists() else None
    if theirs is not None and theirs != labels:
        raise RunError(
            f"{run_dir} trained its CTC head on {len(theirs)} phones or letters and this "
            f"run's data gives {len(labels)} (another --train-clips or --data-dir): resume "
            f"with the data it started with, or start a new --run-dir with --init-from "
            f"{run_dir}"
        )
    if leader:
        (run_dir / CTC_LABELS).write_text(json.dumps(labels, ensure_ascii=False))
    model = tr.model
    n = sum(p.numel() for p in model.parameters())
    mb = 4 * n / 2**20
    over = f": above the {MAX_CHECKPOINT_MB} MB bound for rawcast-tiny" * (mb > MAX_CHECKPOINT_MB)
    shape = f"{cfg.layers} layers, hidden {cfg.hidden}"
    across = f", {rep.world} processes" if rep is not None else ""
    log(f"model: {shape}, {n / 1e6:.1f}M parameters, {mb:.0f} MB in fp32{over}{across}")

    tail = TailAverage(run_dir / "tail", cfg.average_last, cfg.export_every, cfg.steps)

    def save_model() -> None:
        model.eval()
        tail.keep(run.step, model)
        if tail.on and run.step == cfg.steps:
            if tail.missing():
                log(f"--average-last: no snapshot of step(s) {tail.missing()} (saved before "
                    "the run averaged); the mean of the others is exported")  # fmt: skip
            export(tail.averaged(model), out_dir)
        else:
            export(model, out_dir)
        model.train()

    parts: dict[str, Any] = {"model": model, "head": tr.head, "vision_head": tr.vhead}
    if tr.chead is not None:
        parts["count_head"] = tr.chead
    parts["opt"] = tr.opt
    shown = ("loss", "ce", "ctc", "vision", "count", "align")  # those the run computes
    run = RunState(run_dir, parts, cfg, save_model, shown=shown, log=log, writer=leader)
    if cfg.init_from and run.file.exists():
        log(f"{run.file} exists: resuming it (--init-from starts a new run only)")
    run.resume(tr.device)
    if leader:
        (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    model.train()
    ahead = Prefetcher(tr.batch, run.step, prefetch) if prefetch > 0 else None
    try:
        _loop(tr, run, rep, ahead)
    finally:
        if ahead is not None:
            ahead.close()
    run.close()


def _loop(
    tr: Trainer, run: RunState, rep: Replicas | None, ahead: Prefetcher[list[Example]] | None
) -> None:
    while run.running():
        lr = run.lr() if rep is None else rep.leaders(run.lr())[0]  # rank 0 owns the clock
        batch = ahead.get(run.step) if ahead is not None else tr.batch(run.step)
        vals, gn = tr.step(batch, lr)
        if rep is not None:
            vals = rep.mean_values(vals, LOGGED)
        go = run.record(vals, lr=lr, gnorm=gn)
        if rep is not None:
            go = bool(rep.leaders(float(go))[0])
            if (run.save_due() or not go) and not rep.in_sync(tr.params):
                raise RuntimeError(f"the replicas' weights differ at step {run.step}")
        if not go:
            break


def _quiet(_: str) -> None:
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
