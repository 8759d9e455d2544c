"""`rawcast eval`: offline and streamed passes over the same clips, and the baselines.

The eval data is a small shard made from the test fixtures (no TTS needed); the model
is the shipped rawcast-tiny (in the repository), so the texts are real greedy decodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest
from tiny_model import fixture_pcm

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.model.loader import load
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import baselines as B
from rawcast.model.recipe import data as D
from rawcast.model.recipe import decode, speech
from rawcast.model.recipe.commands import eval_command
from rawcast.model.recipe.evaluate import caption_error, chrf, conditions, evaluate, summary, wer
from rawcast.model.recipe.streamed import StreamConfig
from rawcast.pipeline.engine import EngineCore
from rawcast.pipeline.vad import SileroModel
from rawcast.transports.transcribe import transcribe_file

FIXTURES = Path(__file__).parent / "fixtures"


def _clip(audio: npt.NDArray[np.float32], text: str, es: str, voice: str, source: str) -> D.Clip:
    end = speech.voiced_span(audio)[1]  # one "word end": the end of the speech
    return D.Clip(audio, text, es, [end], voice, "clean", source)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An eval shard of two clips: one with a Spanish reference, one without."""
    ked = json.loads((FIXTURES / "heldout_ked_diphone.json").read_text())
    clips = [
        _clip(
            fixture_pcm("heldout_ked_diphone.wav"), ked["text"], ked["spanish"], ked["voice"],
            "grammar",
        ),
        _clip(
            fixture_pcm(), "the quick brown fox jumps over the lazy dog", "", "espeak-ng:en-us",
            "prose",
        ),
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("eval-data")
    D.save_shard(root / "eval-0000.npz", clips)
    return root


@pytest.fixture(scope="module")
def model() -> Gemma4Unified:
    return load("rawcast-tiny")


@pytest.fixture(scope="module")
def both(data_dir: Path) -> tuple[dict[str, Any], str]:
    """`rawcast eval` in its default mode, with the baselines: (result, printed summary)."""
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAWCAST_WHISPER_DIR", raising=False)
        result = eval_command(
            data_dir=data_dir, n_scenes=1, mode="both", baselines=True, log=lines.append
        )
    return result, "\n".join(lines)


def _clips(data_dir: Path) -> Iterator[tuple[dict[str, str], npt.NDArray[np.float32], int]]:
    shard = D.load_shard(data_dir / "eval-0000.npz")
    for i in range(len(shard)):
        yield shard.meta[i], shard.clip_audio(i), shard.clip_ends(i)[-1]


def _write_wav(path: Path, x: npt.NDArray[np.float32]) -> Path:
    """16 kHz float WAV: PyAV reads back exactly these samples."""
    with av.open(str(path), "w", format="wav") as c:
        st = c.add_stream("pcm_f32le", rate=16_000)
        st.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts = 16_000, 0
        for pk in [*st.encode(frame), *st.encode()]:
            c.mux(pk)
    return path


def test_streamed_pass_scores_what_rawcast_transcribe_gives(
    both: tuple[dict[str, Any], str], data_dir: Path, model: Gemma4Unified, tmp_path: Path
) -> None:
    """Each clip's streamed text is `rawcast transcribe`'s final text for the clip followed
    by 1 s of silence, and the streamed WER, chrF and latency are computed from it."""
    result, _ = both
    st = result["streamed"]
    core = EngineCore(model, vad_model=SileroModel())  # as `rawcast transcribe` makes it
    refs, hyps, es_refs, es_hyps, lat = [], [], [], [], []
    for i, (meta, audio, last_word_end) in enumerate(_clips(data_dir)):
        x = np.concatenate([audio, np.zeros(16_000, np.float32)])
        lang = "Spanish" if meta["es"] else None
        t = transcribe_file(core, str(_write_wav(tmp_path / f"{i}.wav", x)), lang, False)
        text = " ".join(s.text for s in t.segments if s.text)
        assert result["examples"][i]["streamed"] == text
        refs.append(meta["text"])
        hyps.append(text)
        if lang:
            es_refs.append(meta["es"])
            es_hyps.append(" ".join(s.translation or "" for s in t.segments).strip())
        lat.append(t.segments[-1].end - last_word_end / 16_000)
    assert any(hyps) and all(es_hyps)
    assert st["wer"] == wer(refs, hyps)
    assert st["chrf_en_es"] == chrf(es_refs, es_hyps)
    assert st["final_latency_s"]["mean"] == pytest.approx(np.mean(lat), abs=1e-3)
    # the VAD's 400 ms end-of-speech wait, within the 1 s of silence
    assert 0.4 <= st["final_latency_s"]["mean"] < 1.0
    assert set(st["wer_by_voice"]) == set(result["wer_by_voice"])


def test_streamed_equals_offline_when_the_engine_sees_the_same_audio(
    model: Gemma4Unified, data_dir: Path
) -> None:
    """Without VAD or trailing silence the engine decodes exactly the offline audio: every
    streamed figure equals its offline one (and the clip texts agree), the camera pass's
    too: the engine puts the picture pushed at the clip's middle where the offline pass
    does, and the caption decoded there leaves the speech's decode as it was."""
    r = evaluate(model, data_dir, n_scenes=0, stream=StreamConfig(vad=False, trail_s=0.0))
    st = r["streamed"]
    assert [e["streamed"] for e in r["examples"]] == [e["hyp"] for e in r["examples"]]
    assert st["wer"] == r["wer_heldout_voices"] and st["wer_by_voice"] == r["wer_by_voice"]
    assert st["chrf_en_es"] == r["chrf_en_es"]
    assert r["examples"][0]["hyp"]  # a real decode, not two empty strings
    cams = [(e["streamed_with_camera"], e["with_camera"]) for e in r["examples"]]
    assert all(a == b for a, b in cams) and cams[0][0], cams
    assert st["with_camera"] == r["with_camera"] and set(st["with_camera"]) == {"wer", "chrf_en_es"}
    for name in ("offline", "streamed"):
        wer_cam = 100 * r["with_camera"]["wer"]
        assert f"with a camera frame mid-utterance ({name}): WER {wer_cam:.1f}%" in summary(r)


def test_a_camera_session_captions_a_scene_as_the_offline_pass_does(
    model: Gemma4Unified, data_dir: Path
) -> None:
    """The streamed caption pass runs each scene through a camera session of the engine,
    which patches it at the checkpoint's budget, as the model was trained and as the
    offline pass decodes it: the same captions, so the same accuracies."""
    from rawcast.model.recipe import decode, scenes
    from rawcast.model.recipe.streamed import ClipStreamer

    streamer = ClipStreamer(model, StreamConfig(vad=False))
    for i in range(3):
        img, _ = scenes.scene(7, i, heldout=bool(i % 2))
        got = streamer.caption(img)
        assert got and got == decode.caption(model, img)
    r = evaluate(model, data_dir, max_clips=1, n_scenes=3, stream=StreamConfig(vad=False))
    errors = r["caption_first_error_heldout"]
    assert errors == r["streamed"]["caption_first_error_heldout"]
    assert sum(errors.values()) == round(3 * (1 - r["caption_acc_heldout"]))
    for key in ("caption_acc_heldout", "caption_acc_seen_compositions"):
        assert r["streamed"][key] == r[key]
        assert (
            f"caption accuracy, {'held-out' if 'held' in key else 'seen'} compositions: "
            f"offline {100 * r[key]:.1f}%, streamed {100 * r[key]:.1f}%" in summary(r)
        )


@pytest.mark.parametrize(
    ("hyp", "kind"),
    [
        ("two red stars on the right", None),
        ("Two red stars, on the right.", None),
        ("three red stars on the right", "count"),
        ("two blue stars on the right", "colour"),
        ("two red triangles on the right", "shape"),
        ("two red stars at the top", "region"),
        ("two red stars", "length"),
        ("", "length"),
    ],
)
def test_a_wrong_caption_is_filed_under_its_first_wrong_word(hyp: str, kind: str | None) -> None:
    assert caption_error("two red stars on the right", hyp) == kind
    two = "a red star and an orange circle"
    assert caption_error(two, "a red star and three orange circles") == "count"


def test_summary_reports_both_passes_and_the_baselines_on_the_same_clips(
    both: tuple[dict[str, Any], str],
) -> None:
    result, printed = both
    assert result["clips"] == 2
    assert result["baselines"]["pocketsphinx"]["clips"] == 2
    assert set(result["baselines"]["pocketsphinx"]["wer_by_voice"]) == set(result["wer_by_voice"])
    assert result["baselines"]["whisper-tiny"] == {"unavailable": "set RAWCAST_WHISPER_DIR"}
    off, st = 100 * result["wer_heldout_voices"], 100 * result["streamed"]["wer"]
    assert f"WER held-out voices: offline {off:.1f}%, streamed {st:.1f}%" in printed
    lat = result["streamed"]["final_latency_s"]["mean"]
    assert f"final text after the last word (media time): mean {lat:.2f} s" in printed
    ps = 100 * result["baselines"]["pocketsphinx"]["wer"]
    assert f"pocketsphinx WER {ps:.1f}% (same clips)" in printed
    assert "whisper-tiny unavailable (set RAWCAST_WHISPER_DIR)" in printed
    assert printed == summary(result)


def _refuse(*args: Any, **kw: Any) -> Any:
    raise AssertionError("this work should have been skipped")


def test_offline_mode_without_baselines_runs_neither_the_engine_nor_the_baselines(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rawcast.model.recipe.evaluate.ClipStreamer", _refuse)
    monkeypatch.setattr(B, "score_all", _refuse)
    r = eval_command(data_dir=data_dir, n_scenes=0, mode="offline", baselines=False, log=_skip)
    assert "streamed" not in r and "baselines" not in r and r["wer_heldout_voices"] is not None
    assert "streamed" not in summary(r)
    assert "caption_acc_heldout" not in r and "caption" not in summary(r)  # --scenes 0
    # by default the baselines run only where pocketsphinx is installed
    monkeypatch.setattr(B, "pocketsphinx_available", lambda: False)
    r = eval_command(data_dir=data_dir, n_scenes=0, mode="offline", log=_skip)
    assert "baselines" not in r


def test_streamed_mode_skips_the_offline_pass(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rawcast.model.recipe.evaluate.decode.transcribe", _refuse)
    monkeypatch.setattr("rawcast.model.recipe.evaluate.decode.caption", _refuse)
    r = eval_command(data_dir=data_dir, mode="streamed", baselines=False, log=_skip)
    assert r["streamed"]["wer"] is not None and "wer_heldout_voices" not in r
    assert summary(r).startswith("clips: 2 (streamed)\nWER held-out voices: streamed ")


def test_offline_pass_scores_each_clip_again_with_a_camera_frame_mid_utterance(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call with video: each held-out clip is transcribed (and, with a Spanish
    reference, translated) again with a held-out scene halfway through its audio, and
    ``with_camera`` scores those decodes against the same references."""
    real = decode.transcribe
    calls: list[tuple[str, bool, str]] = []

    def spy(model: Gemma4Unified, audio: Any, task: str = "transcribe", picture: Any = None) -> str:
        out = real(model, audio, task, picture)
        calls.append((task, picture is not None, out))
        return out

    monkeypatch.setattr("rawcast.model.recipe.evaluate.decode.transcribe", spy)
    r = eval_command(data_dir=data_dir, n_scenes=0, mode="offline", baselines=False, log=_skip)
    cam = [(task, out) for task, pic, out in calls if pic]
    assert [t for t, _ in cam] == ["transcribe", "translate", "transcribe"]
    refs = [m["text"] for m, _, _ in _clips(data_dir)]
    assert r["with_camera"]["wer"] == wer(refs, [o for t, o in cam if t == "transcribe"])
    es = next(m["es"] for m, _, _ in _clips(data_dir) if m["es"])
    assert r["with_camera"]["chrf_en_es"] == chrf([es], [cam[1][1]])
    line = f"with a camera frame mid-utterance (offline): WER {100 * r['with_camera']['wer']:.1f}%"
    assert line in summary(r)


def test_a_camera_frame_goes_between_the_audio_frames_the_engine_saw_before_it() -> None:
    """``decode.prompt_ids(image_after=k)``: k audio placeholders, the image block that
    closes and reopens the audio span, the rest of the audio, then the branch."""
    tok = load("rawcast-tiny").tokenizer
    assert tok is not None
    fmt = PromptFormat(tok)
    head, branch = decode.prompt_ids(fmt, 5, "transcribe", n_cells=3, image_after=2)
    ids = tok.ids
    pre = fmt.stream_prefix()
    assert head == [*pre, ids.audio, ids.audio, *fmt.image_block(3), *[ids.audio] * 3]
    assert head[len(pre) + 2] == ids.eoa and branch == fmt.branch("transcribe")
    late, _ = decode.prompt_ids(fmt, 5, "transcribe", 3, image_after=9)  # after them all
    assert late == [*pre, *[ids.audio] * 5, *fmt.image_block(3)]


def test_seen_clips_score_training_clips_beside_the_held_out_ones(
    data_dir: Path, tmp_path: Path
) -> None:
    """``--seen-clips N`` scores the first N training clips offline; with the same two clips
    as training and held-out shards, both WERs are the same figure."""
    both_splits = tmp_path / "data"
    both_splits.mkdir()
    for split in ("eval", "train"):
        (both_splits / f"{split}-0000.npz").write_bytes((data_dir / "eval-0000.npz").read_bytes())
    lines: list[str] = []
    r = eval_command(
        data_dir=both_splits, n_scenes=0, mode="offline", baselines=False, seen_clips=5,
        log=lines.append,
    )  # fmt: skip
    assert r["seen_clips"] == 2
    assert r["wer_training_voices"] == r["wer_heldout_voices"]
    assert set(r["wer_training_voices_by_engine"]) == {"festival", "espeak-ng"}
    assert "WER training voices and sentences (offline, 2 clips): " in "\n".join(lines)
    one = eval_command(
        data_dir=both_splits, n_scenes=0, mode="offline", baselines=False, seen_clips=1, log=_skip
    )
    assert one["seen_clips"] == 1 and set(one["wer_training_voices_by_engine"]) == {"festival"}
    assert "seen_clips" not in eval_command(
        data_dir=both_splits, n_scenes=0, mode="offline", baselines=False, log=_skip
    )


def test_wer_is_split_by_recording_condition(data_dir: Path) -> None:
    """The augmentation tags name each clip's conditions; both clips here are clean."""
    assert conditions("clean") == ["clean"] and conditions("speed1.10") == ["clean"]
    assert conditions("speed0.93+white10dB+phone+opus32k") == [
        "noise <= 10 dB", "telephone band", "opus",
    ]  # fmt: skip
    assert conditions("pink15dB") == ["noise > 10 dB"] and conditions("opus16k") == ["opus"]
    r = eval_command(data_dir=data_dir, n_scenes=0, mode="offline", baselines=False, log=_skip)
    assert r["wer_by_condition"] == {"clean": round(r["wer_heldout_voices"], 4)}
    assert "  clean: offline " in summary(r)


def test_wer_is_split_by_sentence_source(data_dir: Path) -> None:
    """Grammar sentences and fortune prose each get their own WER (one clip of each)."""
    r = eval_command(data_dir=data_dir, n_scenes=0, mode="offline", baselines=False, log=_skip)
    got = r["wer_by_source"]
    assert set(got) == {"grammar", "prose"}
    ked = json.loads((FIXTURES / "heldout_ked_diphone.json").read_text())["text"]
    hyp = next(e["hyp"] for e in r["examples"] if e["ref"] == ked)
    assert got["grammar"] == round(wer([ked], [hyp]), 4)
    assert "  grammar sentences: offline " in summary(r)


def _skip(*args: Any) -> None:
    pass


def test_eval_flags() -> None:
    from rawcast.model.recipe import commands
    from rawcast.model.recipe.evaluate import MODES
    from rawcast.transports.cli import build_parser

    assert commands.MODES == MODES

    p = build_parser()
    a = p.parse_args(["eval"])
    assert (a.mode, a.baselines, a.threads, a.seen_clips) == ("both", None, 0, 0)
    assert p.parse_args(["eval", "--seen-clips", "120"]).seen_clips == 120
    a = p.parse_args(["eval", "--mode", "offline", "--no-baselines", "--threads", "1"])
    assert (a.mode, a.baselines, a.threads) == ("offline", False, 1)
    assert p.parse_args(["eval", "--baselines"]).baselines is True
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--mode", "live"])
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["eval", "--seen-clips", bad])
