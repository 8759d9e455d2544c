"""Evaluation of a checkpoint on held-out data: WER, chrF, caption accuracy.

Two passes over the same clips (``mode``): offline, each clip decoded in one pass
(``decode.py``), and streamed, each clip through the streaming engine
(``streamed.py``: VAD, trailing silence and end-of-turn latency are explained there).

- WER (jiwer) on held-out voices (festival's voices, flite's awb, espeak-ng's
  Caribbean accent) speaking held-out sentences; lowercased, punctuation stripped.
- chrF (sacrebleu) for English speech -> Spanish text on the same held-out clips,
  split by source: grammar sentences (exact references) and prose (apertium's).
- Caption accuracy: exact match on scenes whose (colour, shape) compositions never
  appear in training; also on fresh renders of training compositions, for context.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.model.recipe import data as D
from rawcast.model.recipe import decode, scenes
from rawcast.model.recipe.streamed import ClipStreamer, StreamConfig
from rawcast.model.recipe.text import normalize
from rawcast.model.recipe.train import truncated
from rawcast.pipeline.media import SAMPLE_RATE


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER; empty references count their hypothesis' words as insertions."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps, strict=True)]
    scored = [(r, h) for r, h in pairs if r]
    ins = sum(len(h.split()) for r, h in pairs if not r)
    n_ref = sum(len(r.split()) for r, _ in scored)
    if not scored:
        return float(ins > 0)
    out = jiwer.process_words([r for r, _ in scored], [h for _, h in scored])
    errors = out.substitutions + out.deletions + out.insertions + ins
    return errors / n_ref


def chrf(refs: list[str], hyps: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hyps, [refs]).score)


MODES = ("offline", "streamed", "both")


def heldout_clips(
    data_root: Path, max_clips: int | None = None, split: str = "eval"
) -> Iterator[tuple[dict[str, str], npt.NDArray[np.float32], list[int]]]:
    """(meta, audio, word ends) of the held-out clips (or of another ``split``), in shard
    order, the first ``max_clips``."""
    count = 0
    for p in D.shards(data_root, split):
        shard = D.load_shard(p)
        for i in range(len(shard)):
            if max_clips is not None and count >= max_clips:
                return
            count += 1
            yield shard.meta[i], shard.clip_audio(i), shard.clip_ends(i)


CONDITIONS = ("clean", "noise <= 10 dB", "noise > 10 dB", "telephone band", "opus")


def conditions(desc: str) -> list[str]:
    """The recording conditions of a clip from its augmentation tags (``speech.augment``:
    e.g. ``speed1.10+pink15dB+phone+opus16k``); a clip can be in several."""
    tags = desc.split("+") if desc else []
    out = [] if any(t != "clean" and not t.startswith("speed") for t in tags) else ["clean"]
    for t in tags:
        if t.endswith("dB"):
            snr = float(re.sub(r"^[a-z]+|dB$", "", t))  # white10dB -> 10
            out.append("noise <= 10 dB" if snr <= 10 else "noise > 10 dB")
        elif t == "phone":
            out.append("telephone band")
        elif t.startswith("opus"):
            out.append("opus")
    return out


class _Speech:
    """References and hypotheses of one pass: transcripts by voice, translations by source."""

    def __init__(self) -> None:
        self.refs: dict[str, list[str]] = defaultdict(list)
        self.hyps: dict[str, list[str]] = defaultdict(list)
        self.es_refs: dict[str, list[str]] = defaultdict(list)
        self.es_hyps: dict[str, list[str]] = defaultdict(list)
        self.cond_refs: dict[str, list[str]] = defaultdict(list)
        self.cond_hyps: dict[str, list[str]] = defaultdict(list)
        self.src_refs: dict[str, list[str]] = defaultdict(list)
        self.src_hyps: dict[str, list[str]] = defaultdict(list)

    def add(self, meta: dict[str, str], hyp: str, es: str | None) -> None:
        self.refs[meta["voice"]].append(meta["text"])
        self.hyps[meta["voice"]].append(hyp)
        for c in conditions(meta.get("desc", "")):
            self.cond_refs[c].append(meta["text"])
            self.cond_hyps[c].append(hyp)
        self.src_refs[meta["source"]].append(meta["text"])
        self.src_hyps[meta["source"]].append(hyp)
        if meta["es"] and es is not None:
            self.es_refs[meta["source"]].append(meta["es"])
            self.es_hyps[meta["source"]].append(es)

    def scores(self) -> dict[str, Any]:
        refs = [r for v in self.refs.values() for r in v]
        hyps = [h for v in self.hyps.values() for h in v]
        out: dict[str, Any] = {
            "wer": wer(refs, hyps) if refs else None,
            "wer_by_voice": {
                v: round(wer(self.refs[v], self.hyps[v]), 4) for v in sorted(self.refs)
            },
            "wer_by_condition": {
                c: round(wer(self.cond_refs[c], self.cond_hyps[c]), 4)
                for c in CONDITIONS
                if self.cond_refs[c]
            },
            # grammar sentences (a small closed vocabulary) apart from fortune prose
            "wer_by_source": {
                k: round(wer(self.src_refs[k], self.src_hyps[k]), 4) for k in sorted(self.src_refs)
            },
        }
        es_refs = [r for v in self.es_refs.values() for r in v]
        if es_refs:
            out["chrf_en_es"] = chrf(es_refs, [h for v in self.es_hyps.values() for h in v])
            out["chrf_by_source"] = {
                s: round(chrf(self.es_refs[s], self.es_hyps[s]), 2) for s in sorted(self.es_refs)
            }
        return out


def evaluate(
    model: Gemma4Unified,
    data_root: Path,
    seed: int = 1234,
    max_clips: int | None = None,
    n_scenes: int = 100,
    mode: str = "both",
    stream: StreamConfig | None = None,
    seen_clips: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Score ``model``: offline (one pass per clip), streamed (the engine) or both.

    The offline keys are at the top level (``wer_heldout_voices``, ``chrf_en_es`` ...,
    captions); the streamed ones under ``streamed``, where each scene is a camera
    session's picture. ``seen_clips`` > 0 also scores that many training clips offline
    (``wer_training_voices``): training voices speaking training sentences, the gap to
    held-out voices apart from how well the model fits what it was trained on."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t0 = time.time()
    if not D.shards(data_root, "eval"):
        raise RuntimeError(
            f"no eval shards under {data_root}: run `rawcast train` (it generates them)"
        )
    offline = mode in ("offline", "both")
    streamer = ClipStreamer(model, stream) if mode in ("streamed", "both") else None
    off, st, cam, st_cam = _Speech(), _Speech(), _Speech(), _Speech()
    examples: list[dict[str, str]] = []
    prefix_refs: list[str] = []
    prefix_hyps: list[str] = []
    latencies: list[float] = []
    no_speech = split = count = 0
    seconds = {"offline": 0.0, "streamed": 0.0}
    for i, (meta, audio, ends) in enumerate(heldout_clips(data_root, max_clips)):
        count += 1
        example = {"voice": meta["voice"], "ref": meta["text"]}
        # the same clip in a call with a camera: a held-out scene mid-utterance
        pic = scenes.scene(seed + CAMERA_SCENES, i, heldout=True)[0]
        if offline:
            t = time.perf_counter()
            hyp = decode.transcribe(model, audio)
            es = decode.transcribe(model, audio, task="translate") if meta["es"] else None
            off.add(meta, hyp, es)
            cut, kept = truncated(audio, meta["text"], ends, np.random.default_rng(i))
            prefix_refs.append(kept)
            prefix_hyps.append(decode.transcribe(model, cut))
            example["hyp"] = hyp
            hyp_c = decode.transcribe(model, audio, picture=pic)
            es_c = decode.transcribe(model, audio, "translate", pic) if meta["es"] else None
            cam.add(meta, hyp_c, es_c)
            example["with_camera"] = hyp_c
            seconds["offline"] += time.perf_counter() - t
        if streamer is not None:
            t = time.perf_counter()
            got = streamer(audio, translate=bool(meta["es"]))
            st.add(meta, got.text, got.translation)
            no_speech += got.segments == 0
            split += got.segments > 1
            if got.end is not None and ends:
                latencies.append(got.end - ends[-1] / SAMPLE_RATE)
            example["streamed"] = got.text
            got_c = streamer(audio, translate=bool(meta["es"]), picture=pic)
            st_cam.add(meta, got_c.text, got_c.translation)
            example["streamed_with_camera"] = got_c.text
            seconds["streamed"] += time.perf_counter() - t
        if len(examples) < 12:
            examples.append(example)
    result: dict[str, Any] = {"clips": count, "mode": mode}
    if offline:
        scores = off.scores()
        result["wer_heldout_voices"] = scores.pop("wer")
        result.update(scores)
        result["wer_truncated_prefix"] = wer(prefix_refs, prefix_hyps) if prefix_refs else None
        result["with_camera"] = _camera(cam)
    if streamer is not None:
        result["streamed"] = {
            **st.scores(),
            "final_latency_s": _spread(latencies),
            "clips_without_speech": no_speech,
            "clips_split": split,
            "vad": streamer.config.vad,
            "trail_s": streamer.config.trail_s,
            "with_camera": _camera(st_cam),
            "seconds": round(seconds["streamed"], 1),
            **_captions(streamer.caption, seed, n_scenes),
        }
    if offline:
        result["offline_speech_seconds"] = round(seconds["offline"], 1)
        result.update(_captions(lambda img: decode.caption(model, img), seed, n_scenes, examples))
    if seen_clips > 0:
        result.update(_seen(model, data_root, seen_clips))
    result["examples"] = examples
    result["seconds"] = round(time.time() - t0, 1)
    return result


CAMERA_SCENES = 555  # the camera pictures' seed offset (the caption scenes use 999)


def _camera(speech: _Speech) -> dict[str, float]:
    scores = speech.scores()
    return {k: scores[k] for k in ("wer", "chrf_en_es") if k in scores}


def _seen(model: Gemma4Unified, data_root: Path, n: int) -> dict[str, Any]:
    """Offline WER on the first ``n`` training clips, overall and by engine."""
    refs: dict[str, list[str]] = defaultdict(list)
    hyps: dict[str, list[str]] = defaultdict(list)
    for meta, audio, _ in heldout_clips(data_root, n, split="train"):
        engine = meta["voice"].split(":")[0]
        refs[engine].append(meta["text"])
        hyps[engine].append(decode.transcribe(model, audio))
    every = [r for v in refs.values() for r in v], [h for v in hyps.values() for h in v]
    return {
        "seen_clips": len(every[0]),
        "wer_training_voices": wer(*every) if every[0] else None,
        "wer_training_voices_by_engine": {e: round(wer(refs[e], hyps[e]), 4) for e in sorted(refs)},
    }


CAPTION_ERRORS = ("count", "colour", "shape", "region", "length")
COUNT_WORDS = frozenset({"a", "an", "one", "two", "three"})


def caption_error(ref: str, hyp: str) -> str | None:
    """What a wrong caption gets wrong first, reading left to right: the ``count``
    (a/an/two/three), a ``colour``, a ``shape``, the ``region`` (or the joining words),
    or only its ``length`` (one caption is a prefix of the other); None when right."""
    r, h = normalize(ref).split(), normalize(hyp).split()
    if r == h:
        return None
    for a, b in zip(r, h, strict=False):
        if a == b:
            continue
        if a in COUNT_WORDS or b in COUNT_WORDS:
            return "count"
        if a in scenes.COLOURS or b in scenes.COLOURS:
            return "colour"
        if a.rstrip("s") in scenes.SHAPES or b.rstrip("s") in scenes.SHAPES:
            return "shape"
        return "region"
    return "length"


def _captions(
    caption: Callable[[npt.NDArray[np.uint8]], str],
    seed: int,
    n_scenes: int,
    examples: list[dict[str, str]] | None = None,
) -> dict[str, float]:
    """Caption accuracy on held-out and on seen compositions, and what each wrong
    held-out caption gets wrong first (``caption_error``; a few examples appended);
    nothing when ``n_scenes`` is 0 (``--scenes 0``: no captions scored)."""
    out: dict[str, Any] = {}
    if n_scenes <= 0:
        return out
    errors = dict.fromkeys(CAPTION_ERRORS, 0)
    for name, held in (("caption_acc_heldout", True), ("caption_acc_seen_compositions", False)):
        ok = 0
        for i in range(n_scenes):
            img, cap = scenes.scene(seed + 999, i, heldout=held)
            got = caption(img)
            kind = caption_error(cap, got)
            ok += int(kind is None)
            if held and kind is not None:
                errors[kind] += 1
            if examples is not None and held and i < 6:
                examples.append({"scene": cap, "caption": got})
        out[name] = ok / max(1, n_scenes)
    out["caption_first_error_heldout"] = errors
    return out


def _spread(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"mean": round(float(np.mean(xs)), 3), "p90": round(float(np.percentile(xs, 90)), 3)}


def summary(result: dict[str, Any]) -> str:
    """The result as lines for people: each figure offline and streamed side by side."""
    st = result.get("streamed") or {}
    lines = [f"clips: {result['clips']} ({_modes(result)})"]
    if result.get("wer_heldout_voices") is not None or st.get("wer") is not None:
        lines.append(
            f"WER held-out voices: {_both(result.get('wer_heldout_voices'), st.get('wer'))}"
        )
        off_v, st_v = result.get("wer_by_voice", {}), st.get("wer_by_voice", {})
        for v in sorted(set(off_v) | set(st_v)):
            lines.append(f"  {v}: {_both(off_v.get(v), st_v.get(v))}")
        off_c, st_c = result.get("wer_by_condition", {}), st.get("wer_by_condition", {})
        for c in [c for c in CONDITIONS if c in off_c or c in st_c]:
            lines.append(f"  {c}: {_both(off_c.get(c), st_c.get(c))}")
        off_s, st_s = result.get("wer_by_source", {}), st.get("wer_by_source", {})
        for k in sorted(set(off_s) | set(st_s)):
            lines.append(f"  {k} sentences: {_both(off_s.get(k), st_s.get(k))}")
    if result.get("wer_training_voices") is not None:
        by = ", ".join(
            f"{e} {100 * x:.1f}%" for e, x in result["wer_training_voices_by_engine"].items()
        )
        lines.append(
            f"WER training voices and sentences (offline, {result['seen_clips']} clips): "
            f"{100 * result['wer_training_voices']:.1f}% ({by})"
        )
    if result.get("wer_truncated_prefix") is not None:
        lines.append(
            f"WER of the prefix on truncated clips: {100 * result['wer_truncated_prefix']:.1f}%"
        )
    for name, r in (("offline", result), ("streamed", st)):
        cam = r.get("with_camera") or {}
        if cam.get("wer") is not None:
            es = f", chrF EN->ES {cam['chrf_en_es']:.1f}" if "chrf_en_es" in cam else ""
            lines.append(
                f"with a camera frame mid-utterance ({name}): WER {100 * cam['wer']:.1f}%{es}"
            )
    if "chrf_en_es" in result or "chrf_en_es" in st:
        parts = [
            f"{name} {r['chrf_en_es']:.1f} {r['chrf_by_source']}"
            for name, r in (("offline", result), ("streamed", st))
            if "chrf_en_es" in r
        ]
        lines.append("chrF EN->ES: " + ", ".join(parts))
    if st:
        vad = "Silero VAD" if st["vad"] else "no VAD"
        lines.append(
            f"streamed: engine, {vad}, {st['trail_s']:g} s of silence after each clip; "
            f"{st['clips_without_speech']} clips without speech, {st['clips_split']} split"
        )
        lat = st.get("final_latency_s")
        if lat is not None:
            lines.append(
                f"streamed final text after the last word (media time): "
                f"mean {lat['mean']:.2f} s, p90 {lat['p90']:.2f} s"
            )
    for key, what in (
        ("caption_acc_heldout", "held-out"),
        ("caption_acc_seen_compositions", "seen"),
    ):
        if key in result or key in st:
            both = _both(result.get(key), st.get(key))
            lines.append(f"caption accuracy, {what} compositions: {both}")
    for name, r in (("offline", result), ("streamed", st)):
        if r.get("caption_first_error_heldout"):
            kinds = ", ".join(f"{k} {n}" for k, n in r["caption_first_error_heldout"].items())
            lines.append(f"held-out captions' first error ({name}): {kinds}")
    for name, b in (result.get("baselines") or {}).items():
        if "unavailable" in b:
            lines.append(f"{name} unavailable ({b['unavailable']})")
        else:
            same = "same clips" if b["clips"] == result["clips"] else f"{b['clips']} clips"
            lines.append(f"{name} WER {100 * b['wer']:.1f}% ({same})")
    return "\n".join(lines)


def _modes(result: dict[str, Any]) -> str:
    mode = str(result.get("mode", "offline"))
    return "offline and streamed" if mode == "both" else mode


def _both(offline: float | None, streamed: float | None) -> str:
    parts = [
        f"{name} {100 * x:.1f}%"
        for name, x in (("offline", offline), ("streamed", streamed))
        if x is not None
    ]
    return ", ".join(parts)


def clip_wer(model: Gemma4Unified, audio: np.ndarray, ref: str) -> tuple[float, str]:
    hyp = decode.transcribe(model, audio.astype(np.float32))
    return wer([ref], [hyp]), hyp
