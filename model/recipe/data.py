"""Offline data generation for rawcast-tiny: sentences, speech shards, tokenizer, hashes.

Design decisions:

- Deterministic from one seed: every clip is a pure function of (seed, split, index)
  (its own ``numpy`` generator), so shards can be made in any order, by any number
  of worker processes, and resumed: a shard that exists is not made again.
- Splits: ``train`` (training voices, training sentences) and ``eval`` (held-out
  voices speaking held-out sentences). Scenes are rendered on the fly from
  (seed, index) and need no storage.
- A shard is one ``.npz`` of int16 audio (concatenated, with offsets), texts,
  Spanish texts, word end times, voices and augmentation tags. ``content_hash``
  hashes the arrays (not the zip bytes, which carry timestamps).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rawcast.model.recipe import scenes, speech, text

SHARD = 250
PROMPT_TEXTS = (
    "user\n",
    "model\n",
    "\nTranscribe the audio.",
    "\nTranslate the audio into Spanish.",
    "\nDescribe the image in one sentence.",
    "\n",
)


@dataclass(frozen=True)
class DataConfig:
    seed: int = 1234
    train_clips: int = 10_500
    eval_clips_per_voice: int = 40
    grammar_sentences: int = 30_000
    heldout_fraction: float = 0.05
    prose_share: float = 0.35  # share of training clips that speak fortune prose
    # Share of training clips spoken by flite's voices, the rest by espeak-ng's. Drawn
    # uniformly over all voices, flite's four would speak 4 % of the clips, and the
    # held-out voices are mostly of its kind (diphone and statistical-parametric
    # recordings of real speakers, not formant synthesis).
    flite_share: float = 0.5
    vocab_size: int = 3000


def sentences(cfg: DataConfig) -> dict[str, list[list[str]]]:
    """{train_grammar, eval_grammar, train_prose, eval_prose}: lists of [english, spanish]."""
    rng = random.Random(f"grammar-{cfg.seed}")
    pairs: dict[str, str] = {}
    for _ in range(cfg.grammar_sentences):
        en, es = text.grammar_pair(rng)
        pairs.setdefault(en, es)
    g_train, g_eval = text.split_holdout(pairs, cfg.seed, cfg.heldout_fraction)
    prose = text.fortune_sentences()
    p_train, p_eval = text.split_holdout(prose, cfg.seed + 1, cfg.heldout_fraction)
    out: dict[str, list[list[str]]] = {
        "train_grammar": [[e, pairs[e]] for e in g_train],
        "eval_grammar": [[e, pairs[e]] for e in g_eval],
    }
    for name, items in (("train_prose", p_train), ("eval_prose", p_eval)):
        spanish = text.apertium_en_es(items) if text.apertium_available() else [""] * len(items)
        out[name] = [[e, s] for e, s in zip(items, spanish, strict=True)]
    return out


def load_sentences(root: Path, cfg: DataConfig) -> dict[str, list[list[str]]]:
    f = root / "sentences.json"
    if f.exists():
        data: dict[str, list[list[str]]] = json.loads(f.read_text())
        return data
    data = sentences(cfg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    tmp.replace(f)
    return data


@dataclass(frozen=True)
class Clip:
    audio: npt.NDArray[np.float32]
    text: str
    spanish: str
    word_ends: list[int]
    voice: str
    desc: str
    source: str  # grammar | prose


def make_clip(
    seed: int,
    split: str,
    index: int,
    sents: dict[str, list[list[str]]],
    voices: Sequence[speech.Voice],
    prose_share: float,
    strength: float = 1.0,
    flite_share: float = 0.5,
) -> Clip:
    """Clip ``index`` of ``split``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, index])
    prose = sents[f"{split}_prose"]
    source = "prose" if (prose and rng.random() < prose_share) else "grammar"
    pool = sents[f"{split}_{source}"]
    en, es = pool[int(rng.integers(len(pool)))]
    voice = (
        pick_voice(voices, rng, flite_share) if split == "train" else voices[index % len(voices)]
    )
    speed = float(rng.uniform(0.85, 1.2))
    pitch = int(rng.integers(30, 71))
    clean = speech.synth(voice, en, speed=speed, pitch=pitch)
    aug = speech.augment(clean, speech.word_ends(clean, en), rng, strength)
    return Clip(aug.audio, en, es, aug.word_ends, voice.key, aug.desc, source)


def pick_voice(
    voices: Sequence[speech.Voice], rng: np.random.Generator, flite_share: float
) -> speech.Voice:
    """flite's voices with probability ``flite_share`` (when both engines are present),
    else espeak-ng's; uniform within the engine."""
    flite = [v for v in voices if v.engine == "flite"]
    rest = [v for v in voices if v.engine != "flite"]
    pool = (flite if rng.random() < flite_share else rest) if flite and rest else list(voices)
    return pool[int(rng.integers(len(pool)))]


def save_shard(path: Path, clips: Sequence[Clip]) -> None:
    audio = [np.round(c.audio * 32767).astype(np.int16) for c in clips]
    offsets = np.cumsum([0, *[a.size for a in audio]]).astype(np.int64)
    ends = [np.asarray(c.word_ends, np.int64) for c in clips]
    end_offsets = np.cumsum([0, *[e.size for e in ends]]).astype(np.int64)
    meta = [
        {"text": c.text, "es": c.spanish, "voice": c.voice, "desc": c.desc, "source": c.source}
        for c in clips
    ]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        audio=np.concatenate(audio) if audio else np.zeros(0, np.int16),
        offsets=offsets,
        word_ends=np.concatenate(ends) if ends else np.zeros(0, np.int64),
        end_offsets=end_offsets,
        meta=np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8),
    )
    tmp.replace(path)


@dataclass(frozen=True)
class Shard:
    audio: npt.NDArray[np.int16]
    offsets: npt.NDArray[np.int64]
    word_ends: npt.NDArray[np.int64]
    end_offsets: npt.NDArray[np.int64]
    meta: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.meta)

    def clip_audio(self, i: int) -> npt.NDArray[np.float32]:
        a = self.audio[self.offsets[i] : self.offsets[i + 1]]
        return a.astype(np.float32) / 32767.0

    def clip_ends(self, i: int) -> list[int]:
        return [int(x) for x in self.word_ends[self.end_offsets[i] : self.end_offsets[i + 1]]]


def load_shard(path: Path) -> Shard:
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        return Shard(z["audio"], z["offsets"], z["word_ends"], z["end_offsets"], meta)


def content_hash(paths: Sequence[Path]) -> str:
    """sha256 over the arrays of the given shards, in order (zip timestamps excluded)."""
    h = hashlib.sha256()
    for p in paths:
        with np.load(p) as z:
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
    return h.hexdigest()


def scene_hash(seed: int, indices: Sequence[int], heldout: bool = False) -> str:
    h = hashlib.sha256()
    for i in indices:
        img, cap = scenes.scene(seed, i, heldout)
        h.update(img.tobytes())
        h.update(cap.encode())
    return h.hexdigest()


def _shard_job(args: tuple[Path, int, str, int, int, dict[str, Any]]) -> str:
    path, seed, split, start, stop, opts = args
    root = path.parent
    sents = json.loads((root / "sentences.json").read_text())
    voices = speech.train_voices() if split == "train" else speech.heldout_voices()
    fs = opts["flite_share"]
    clips = [
        make_clip(seed, split, i, sents, voices, opts["prose_share"], opts["strength"], fs)
        for i in range(start, stop)
    ]
    save_shard(path, clips)
    return path.name


def check_config(root: Path, cfg: DataConfig) -> None:
    """Refuse to add shards to data made under another config (a mix would train on
    both silently). ``train_clips`` may differ: it only says how many shards there are."""
    f = root / "data_config.json"
    if not f.exists():
        return
    old = {k: v for k, v in json.loads(f.read_text()).items() if k != "train_clips"}
    new = {k: v for k, v in cfg.__dict__.items() if k != "train_clips"}
    if old != new:
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ValueError(
            f"{root} holds data made with another config ({', '.join(diff)} differ): "
            "remove it or choose another --data-dir"
        )


def generate(
    root: Path,
    cfg: DataConfig,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
    splits: Sequence[str] = ("train", "eval"),
) -> list[Path]:
    """Make every missing shard of ``splits``; returns their paths. Resumable."""
    root.mkdir(parents=True, exist_ok=True)
    check_config(root, cfg)
    load_sentences(root, cfg)
    (root / "data_config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    n_eval = cfg.eval_clips_per_voice * len(speech.heldout_voices())
    jobs: list[tuple[Path, int, str, int, int, dict[str, Any]]] = []
    for split, total, strength in (("train", cfg.train_clips, 1.0), ("eval", n_eval, 0.5)):
        if split not in splits:
            continue
        for k, start in enumerate(range(0, total, SHARD)):
            path = root / f"{split}-{k:04d}.npz"
            opts = {
                "prose_share": cfg.prose_share,
                "strength": strength,
                "flite_share": cfg.flite_share,
            }
            jobs.append((path, cfg.seed, split, start, min(total, start + SHARD), opts))
    todo = [j for j in jobs if not j[0].exists()]
    if todo:
        if workers <= 1:
            for j in todo:
                name = _shard_job(j)
                if progress:
                    progress(name)
        else:
            with ProcessPoolExecutor(workers) as ex:
                for name in ex.map(_shard_job, todo):
                    if progress:
                        progress(name)
    return [j[0] for j in jobs]


def shards(root: Path, split: str) -> list[Path]:
    return sorted(root.glob(f"{split}-[0-9][0-9][0-9][0-9].npz"))


# --- tokenizer ---------------------------------------------------------------------------


def tokenizer_corpus(sents: dict[str, list[list[str]]], seed: int) -> list[str]:
    lines: list[str] = []
    for key in ("train_grammar", "train_prose"):
        for en, es in sents[key]:
            lines.append(en)
            if es:
                lines.append(es)
    for i in range(3000):
        lines.append(scenes.scene_caption(seed, i))
    lines.extend(PROMPT_TEXTS * 50)
    return lines


def train_tokenizer(sents: dict[str, list[list[str]]], cfg: DataConfig) -> Any:
    """A byte-level BPE with Gemma 4's special tokens at fixed low ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rawcast.model.recipe.config import SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(sents, cfg.seed), trainer=trainer)
    return tok
