"""Evaluation of a checkpoint on held-out data: WER, chrF, caption accuracy.

- WER (jiwer) on held-out voices (festival's voices, flite's awb, espeak-ng's
  Caribbean accent) speaking held-out sentences; lowercased, punctuation stripped.
- chrF (sacrebleu) for English speech -> Spanish text on the same held-out clips,
  split by source: grammar sentences (exact references) and prose (apertium's).
- Caption accuracy: exact match on scenes whose (colour, shape) compositions never
  appear in training; also on fresh renders of training compositions, for context.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.model.recipe import data as D
from rawcast.model.recipe import decode, scenes
from rawcast.model.recipe.text import normalize
from rawcast.model.recipe.train import truncated


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


def evaluate(
    model: Gemma4Unified,
    data_root: Path,
    seed: int = 1234,
    max_clips: int | None = None,
    n_scenes: int = 100,
    log: Any = print,
) -> dict[str, Any]:
    t0 = time.time()
    paths = D.shards(data_root, "eval")
    if not paths:
        raise RuntimeError(
            f"no eval shards under {data_root}: run `rawcast train` (it generates them)"
        )
    refs: dict[str, list[str]] = defaultdict(list)
    hyps: dict[str, list[str]] = defaultdict(list)
    es_refs: dict[str, list[str]] = defaultdict(list)
    es_hyps: dict[str, list[str]] = defaultdict(list)
    examples: list[dict[str, str]] = []
    prefix_refs: list[str] = []
    prefix_hyps: list[str] = []
    count = 0
    for p in paths:
        shard = D.load_shard(p)
        for i in range(len(shard)):
            if max_clips is not None and count >= max_clips:
                break
            count += 1
            meta = shard.meta[i]
            audio = shard.clip_audio(i)
            hyp = decode.transcribe(model, audio)
            refs[meta["voice"]].append(meta["text"])
            hyps[meta["voice"]].append(hyp)
            if meta["es"]:
                es = decode.transcribe(model, audio, task="translate")
                es_refs[meta["source"]].append(meta["es"])
                es_hyps[meta["source"]].append(es)
            cut, kept = truncated(audio, meta["text"], shard.clip_ends(i), np.random.default_rng(i))
            prefix_refs.append(kept)
            prefix_hyps.append(decode.transcribe(model, cut))
            if len(examples) < 12:
                examples.append({"voice": meta["voice"], "ref": meta["text"], "hyp": hyp})
    all_refs = [r for v in refs.values() for r in v]
    all_hyps = [h for v in hyps.values() for h in v]
    result: dict[str, Any] = {
        "clips": count,
        "wer_heldout_voices": wer(all_refs, all_hyps) if all_refs else None,
        "wer_by_voice": {v: round(wer(refs[v], hyps[v]), 4) for v in sorted(refs)},
        "wer_truncated_prefix": wer(prefix_refs, prefix_hyps) if prefix_refs else None,
    }
    all_es_refs = [r for v in es_refs.values() for r in v]
    all_es_hyps = [h for v in es_hyps.values() for h in v]
    if all_es_refs:
        result["chrf_en_es"] = chrf(all_es_refs, all_es_hyps)
        result["chrf_by_source"] = {
            s: round(chrf(es_refs[s], es_hyps[s]), 2) for s in sorted(es_refs)
        }
    for name, held in (("caption_acc_heldout", True), ("caption_acc_seen_compositions", False)):
        ok = 0
        for i in range(n_scenes):
            img, cap = scenes.scene(seed + 999, i, heldout=held)
            got = decode.caption(model, img)
            ok += int(normalize(got) == normalize(cap))
            if held and i < 6:
                examples.append({"scene": cap, "caption": got})
        result[name] = ok / max(1, n_scenes)
    result["examples"] = examples
    result["seconds"] = round(time.time() - t0, 1)
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"clips: {result['clips']}"]
    if result.get("wer_heldout_voices") is not None:
        lines.append(f"WER held-out voices: {100 * result['wer_heldout_voices']:.1f}%")
        for v, w in result["wer_by_voice"].items():
            lines.append(f"  {v}: {100 * w:.1f}%")
    if result.get("wer_truncated_prefix") is not None:
        lines.append(
            f"WER of the prefix on truncated clips: {100 * result['wer_truncated_prefix']:.1f}%"
        )
    if "chrf_en_es" in result:
        lines.append(f"chrF EN->ES: {result['chrf_en_es']:.1f}  {result['chrf_by_source']}")
    lines.append(
        f"caption accuracy, held-out compositions: {100 * result['caption_acc_heldout']:.1f}%"
    )
    lines.append(
        f"caption accuracy, seen compositions: {100 * result['caption_acc_seen_compositions']:.1f}%"
    )
    return "\n".join(lines)


def clip_wer(model: Gemma4Unified, audio: np.ndarray, ref: str) -> tuple[float, str]:
    hyp = decode.transcribe(model, audio.astype(np.float32))
    return wer([ref], [hyp]), hyp
