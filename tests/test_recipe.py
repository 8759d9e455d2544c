"""The rawcast-tiny recipe: deterministic data, the training forward, and the shipped model."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import wave
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rawcast.model import preset
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.recipe import data as D
from rawcast.model.recipe import decode, scenes, speech, text
from rawcast.model.recipe import train as T
from rawcast.model.recipe.average import TailAverage
from rawcast.model.recipe.evaluate import wer

FIXTURES = Path(__file__).parent / "fixtures"
CLIP = FIXTURES / "heldout_ked_diphone.wav"
# Measured on the shipped checkpoint; a regression shows up as a higher WER.
FIXTURE_MAX_WER = 0.5

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"
)


def _read(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == 16_000 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def test_normalize_spells_digits_and_drops_punctuation() -> None:
    """Targets are lowercase words: digits spelled out, apostrophes inside words kept."""
    assert text.normalize("I have 3 dogs, and it's 21!") == "i have three dogs and it's twenty one"


def test_grammar_is_seeded() -> None:
    """The grammar is a pure function of its generator."""
    a = [text.grammar_pair(random.Random(5)) for _ in range(3)]
    b = [text.grammar_pair(random.Random(5)) for _ in range(3)]
    assert a == b and all(en and es for en, es in a)


def _write_sentences(root: Path, n: int) -> None:
    """``n`` grammar pairs as both splits' sentences (no prose) in ``root``."""
    rng = random.Random(0)
    pairs = [list(text.grammar_pair(rng)) for _ in range(n)]
    sents = {"train_grammar": pairs, "eval_grammar": pairs, "train_prose": [], "eval_prose": []}
    (root / "sentences.json").write_text(json.dumps(sents))


@needs_espeak
def test_data_generation_is_deterministic(tmp_path: Path) -> None:
    """Two runs with the same seed give the same data hash (a small slice)."""
    cfg = D.DataConfig(seed=7, train_clips=3, eval_clips_per_voice=0)
    hashes = []
    for run in ("a", "b"):
        root = tmp_path / run
        root.mkdir()
        _write_sentences(root, 8)
        paths = D.generate(root, cfg, workers=1, splits=("train",))
        assert len(D.load_shard(paths[0])) == 3
        hashes.append(D.content_hash(paths))
    assert hashes[0] == hashes[1]
    assert D.scene_hash(7, range(3)) == D.scene_hash(7, range(3))


def test_augmentation_is_seeded_and_keeps_word_times_ordered() -> None:
    t = np.arange(16_000, dtype=np.float32) / 16_000
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    a = speech.augment(x, [8000, 16000], np.random.default_rng(3))
    b = speech.augment(x, [8000, 16000], np.random.default_rng(3))
    assert np.array_equal(a.audio, b.audio) and a.word_ends == b.word_ends
    assert a.word_ends[0] < a.word_ends[1] <= a.audio.size


def test_truncated_audio_keeps_the_words_spoken_before_the_cut() -> None:
    audio = np.zeros(48_000, np.float32)
    ends = [10_000, 20_000, 30_000, 40_000]
    for seed in range(20):
        cut, words = T.truncated(audio, "one two three four", ends, np.random.default_rng(seed))
        n = len(words.split())
        assert words == " ".join("one two three four".split()[:n])
        assert all(e <= cut.size for e in ends[:n])


def test_voice_shift_scales_every_frequency_and_keeps_the_clip_whole() -> None:
    """``--voice-shift``: a 200 Hz tone comes back at 200 x f Hz and 1/f as long, for a
    seeded factor f in VOICE_SHIFT; share 0 leaves every clip as stored."""
    t = np.arange(32_000) / 16_000
    x = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    lo, hi = T.VOICE_SHIFT
    factors = []
    for seed in range(6):
        y = T.voice_shift(x, np.random.default_rng(seed), 1.0)
        assert np.array_equal(y, T.voice_shift(x, np.random.default_rng(seed), 1.0))
        f = x.size / y.size
        assert lo - 0.01 <= f <= hi + 0.01
        peak = np.argmax(np.abs(np.fft.rfft(y * np.hanning(y.size)))) * 16_000 / y.size
        assert peak == pytest.approx(200 * f, abs=2.0)
        factors.append(f)
        no = T.voice_shift(x, np.random.default_rng(seed), 0.0)
        assert no is x
    assert max(factors) - min(factors) > 0.1  # not one fixed factor


def test_phone_units_join_ties_and_long_vowels_and_drop_stress() -> None:
    assert T.phone_units("k\u02c8a\u200d\u028ab\u0254\u200d\u026a") == [
        "k",
        "a\u028a",
        "b",
        "\u0254\u026a",
    ]
    assert T.phone_units("s\u02cci\u02d0p") == ["s", "i\u02d0", "p"]


def test_lexicon_labels_are_phones_and_unknown_words_give_none() -> None:
    lex = T.Lexicon({"a": ["\u0259"], "cat": ["k", "\u00e6", "t"]}, ("k", "t", "\u0259", "\u00e6"))
    assert lex.labels("a cat") == [3, 1, 4, 2]
    assert lex.labels("a dog") == []


@needs_espeak
def test_lexicon_is_built_with_espeak_and_cached(tmp_path: Path) -> None:
    lex = T.Lexicon.build(tmp_path, ["the cat", "a cat"])
    assert set(lex.words) == {"the", "cat", "a"} and lex.words["cat"][0] == "k"
    assert (tmp_path / "lexicon.json").exists()
    assert T.Lexicon.build(tmp_path, ["cat"]).words == {"cat": lex.words["cat"]}


def test_held_out_scene_compositions_never_appear_in_training() -> None:
    for i in range(200):
        groups, _ = scenes.sample_groups(random.Random(i), heldout=False)
        assert all((g.colour, g.shape) not in scenes.HELDOUT_PAIRS for g in groups)


def test_captions_say_an_before_a_vowel() -> None:
    g = scenes.Group
    two = [g("orange", "circle", 1), g("red", "star", 2)]
    assert scenes.describe(two, None) == "an orange circle and two red stars"
    assert scenes.describe([g("blue", "square", 1)], "on the left") == "a blue square on the left"


def test_cell_labels_name_each_object_in_the_cell_of_its_centre() -> None:
    """The vision loss's targets: the patch cell (as ``patch_image`` cuts the frame) that
    holds an object's centre is labelled with that object's colour and shape, and its
    pixels there are that colour; cells without a centre are 0."""
    from rawcast.pipeline.vision import patch_image

    colours, checked = list(scenes.COLOURS), 0
    for i in range(40):
        rng = random.Random(f"scene-3-{i}-0")
        groups, region = scenes.sample_groups(rng, heldout=False)
        frame, objects = scenes.render(groups, region, rng)
        colour, shape = scenes.cell_labels(objects)
        grid = patch_image(frame, max_soft_tokens=T.IMAGE_BUDGET)  # as training patches it
        assert grid.num_cells == colour.size == 64
        labelled, caption, _ = scenes.labelled_scene(3, i)
        assert (labelled == frame).all() and caption == scenes.scene_caption(3, i)
        first = min(objects, key=lambda o: o.cx)  # two groups are named left to right
        assert caption.split(" and ")[0].split()[1:3] in (
            [first.colour, first.shape],
            [first.colour, scenes.PLURAL[first.shape]],
        )
        cells = [int(o.cy // scenes.CELL) * 8 + int(o.cx // scenes.CELL) for o in objects]
        assert len(objects) == sum(gr.count for gr in groups)
        assert set(np.flatnonzero(colour)) == set(cells) == set(np.flatnonzero(shape))
        for o, c in zip(objects, cells, strict=True):
            if cells.count(c) > 1:
                continue  # two centres in one cell: the last drawn names it
            assert colours[colour[c] - 1] == o.colour and scenes.SHAPES[shape[c] - 1] == o.shape
            px = grid.cells[c].reshape(48, 48, 3)[int(o.cy) % 48, int(o.cx) % 48] * 255
            assert np.abs(px - np.array(scenes.COLOURS[o.colour])).max() <= 27
            checked += 1
    assert checked > 80


def test_count_labels_give_each_shape_the_size_of_its_group() -> None:
    """The count loss's targets: the cell of each shape's centre holds how many shapes of
    its colour and kind the scene has (the count its caption says), empty cells 0."""
    checked = 0
    for i in range(40):
        rng = random.Random(f"scene-5-{i}-0")
        groups, region = scenes.sample_groups(rng, heldout=False)
        _, objects = scenes.render(groups, region, rng)
        colour, shape = scenes.cell_labels(objects)
        counts = T.count_labels(colour, shape)
        assert set(np.flatnonzero(counts)) == set(np.flatnonzero(shape))
        cells = [int(o.cy // scenes.CELL) * 8 + int(o.cx // scenes.CELL) for o in objects]
        if len(set(cells)) < len(cells):
            continue  # two centres in one cell: that group looks one smaller
        for o, c in zip(objects, cells, strict=True):
            (g,) = [g for g in groups if (g.colour, g.shape) == (o.colour, o.shape)]
            assert counts[c] == g.count
            checked += 1
    assert checked > 60


def test_vision_loss_reads_the_image_cells_in_raster_order() -> None:
    """The training-only vision loss is None without labelled images, and it takes each
    image position's state with the label of that same cell: a middle layer that holds
    the labels one-hot scores a lower loss than the same states shuffled."""
    model = Gemma4Unified(preset("tiny"))
    tk = model.cfg.tokens
    n_col = T.VISION_CLASSES[0]
    colour = np.arange(4) % n_col
    shape = np.array([0, 2, 4, 1])
    cells = (torch.rand(4, 6912), torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]))
    ex = T.Example([2, tk.boi, *[tk.image] * 4, tk.eoi, 13], 7, image=cells, task="caption",
                   cell_labels=(colour, shape))  # fmt: skip
    speech_only = T.Example([2, tk.boa, tk.audio, tk.eoa, 13], 4, audio=np.zeros((1, 640), "f4"))
    p, _ = T.pack_batch(model, [speech_only, ex])
    hidden = model.cfg.text.hidden_size
    head = T.vision_head(hidden)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for k in range(sum(T.VISION_CLASSES)):
            head.weight[k, k] = 30.0
    mid = torch.zeros(2, p.input_ids.shape[1], hidden)
    pos = (p.input_ids[1] == tk.image).nonzero().view(-1)
    for j, q in enumerate(pos.tolist()):
        mid[1, q, colour[j]] = mid[1, q, n_col + shape[j]] = 1.0
    shuffled = mid.clone()
    shuffled[1, pos] = mid[1, pos.flip(0)]
    with torch.no_grad():
        assert T.vision_loss(model, head, p, mid, [speech_only]) is None
        right = T.vision_loss(model, head, p, mid, [speech_only, ex])
        wrong = T.vision_loss(model, head, p, shuffled, [speech_only, ex])
    assert right is not None and wrong is not None
    assert float(right) < 0.01 < 1.0 < float(wrong)
    # Shape counts only where an object sits: any shape guess in the empty cell is free,
    # a wrong one in an occupied cell is not.
    empty, occupied = int(pos[0]), int(pos[1])
    guess_empty, guess_occupied = mid.clone(), mid.clone()
    shapes = slice(n_col, n_col + T.VISION_CLASSES[1])
    guess_empty[1, empty, shapes] = torch.eye(T.VISION_CLASSES[1])[3]
    guess_occupied[1, occupied, shapes] = torch.eye(T.VISION_CLASSES[1])[3]
    with torch.no_grad():
        free = T.vision_loss(model, head, p, guess_empty, [speech_only, ex])
        costly = T.vision_loss(model, head, p, guess_occupied, [speech_only, ex])
    assert free is not None and costly is not None
    assert float(free) == pytest.approx(float(right), abs=1e-6)
    assert float(costly) > 1.0


def test_training_forward_equals_the_backbone() -> None:
    """The training forward is forward_packed without a cache: same logits."""
    torch.manual_seed(0)
    model = Gemma4Unified(preset("tiny")).eval()
    tk = model.cfg.tokens
    rows = [
        Append(0, [2, 10, tk.boa, *[tk.audio] * 5, tk.eoa, 11, 12], audio=torch.randn(5, 640)),
        Append(
            1,
            [2, tk.boi, *[tk.image] * 4, tk.eoi, 13],
            images=[(torch.rand(4, 6912), torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]))],
        ),
    ]
    p = model.pack(rows, None, pad_to=16)
    with torch.no_grad():
        h, _ = T.hidden_states(model, p, tap=2)
        ours = T.output_logits(model, h)
        ref = model.forward_packed(p, None, all_logits=True)
    valid = p.valid
    torch.testing.assert_close(ours[valid], ref[valid], rtol=0, atol=1e-5)


def test_fourier_init_has_unit_rows() -> None:
    w = T.fourier_basis(256)
    assert w.shape == (256, 640)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(256))


@pytest.mark.parametrize("band", [2, 13, 27])
def test_subwindow_init_is_a_spectrogram_apart_from_the_raw_values(band: int) -> None:
    """At init (``rawcast train --frontend subwindow``), a tone sounding in the first
    20 ms of a frame puts its energy, through the first MLP, into that window's dim of
    the band nearest its frequency, none into the last window, and none into the dims
    that carry the raw Fourier values."""
    from rawcast.model.gemma4 import DecoderLayer
    from rawcast.model.recipe.config import tiny_config

    model = Gemma4Unified(tiny_config(300))
    T.init_model(model, 0, "subwindow")
    bands = T.subwindow_init(model)  # idempotent: returns the band count
    assert bands == 28
    raw = 6 * bands
    f = T.mel_grid(bands, 60, 7600)[band]
    frame = np.zeros(T.FRAME, dtype=np.float32)
    frame[:320] = np.sin(2 * np.pi * f * np.arange(320) / T.RATE)
    layer = model.layers[0]
    assert isinstance(layer, DecoderLayer) and model.audio is not None
    with torch.no_grad():
        h = layer.pre_feedforward_layernorm(model.audio(torch.from_numpy(frame)[None]))
        out = layer.mlp(h)[0]
    energy = out[raw : raw + 3 * bands].view(3, bands)
    assert int(energy[0].argmax()) == band
    assert float(energy[2].abs().max()) < 1e-6 * float(energy[0].max())
    assert float(out[:raw].abs().max()) == 0.0


def test_zero_branches_pass_the_spectrogram_through_every_layer() -> None:
    """With ``zero_branches`` the residual after all four layers is the embedded frame
    plus the first MLP's spectrogram, exactly; at the plain init the random branches
    change it (what ``bench/frontend.py``'s ``subwindow-zero`` row measures)."""
    from rawcast.model.gemma4 import DecoderLayer
    from rawcast.model.recipe.config import tiny_config

    frames = torch.from_numpy(
        np.random.default_rng(0).standard_normal((6, T.FRAME)).astype(np.float32)
    )
    n = frames.shape[0]
    pos = torch.arange(n)[None]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    outs = []
    for zero in (True, False):
        model = Gemma4Unified(tiny_config(300))
        T.init_model(model, 0, "subwindow")
        if zero:
            T.zero_branches(model)
        layer = model.layers[0]
        assert isinstance(layer, DecoderLayer) and model.audio is not None
        with torch.no_grad():
            x0 = model.audio(frames)
            spectrogram = x0 + layer.post_feedforward_layernorm(
                layer.mlp(layer.pre_feedforward_layernorm(x0))
            )
            y, _ = model.run_layers(x0[None], pos, {True: mask, False: mask}, None)
        outs.append(float((y[0] - spectrogram).abs().max()))
    assert outs[0] < 1e-5
    assert outs[1] > 0.5


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        T.build(Path("nowhere"), T.TrainConfig(precision="fp8"), D.DataConfig())


def test_unknown_frontend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown front end 'mel'"):
        T.init_model(Gemma4Unified(preset("tiny")), 0, "mel")


# --- the shipped checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Gemma4Unified:
    from rawcast.model.loader import BUNDLED_DIR, load

    if not (BUNDLED_DIR / "rawcast-tiny" / "config.json").exists():
        pytest.skip("rawcast-tiny is not bundled in this checkout")
    return load("rawcast-tiny")


def _hf_greedy(path: Path, ids: list[int], frames: torch.Tensor, stop: set[int]) -> list[int]:
    from transformers import Gemma4UnifiedForConditionalGeneration

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(path).eval()
    audio_id = model.config.audio_token_id
    out: list[int] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(40):
            x = torch.tensor([seq])
            tt = (x == audio_id).long() * 3
            logits = model(
                input_ids=x,
                input_features=frames.view(1, -1, 640),
                input_features_mask=torch.ones(1, frames.shape[0], dtype=torch.bool),
                mm_token_type_ids=tt,
                use_cache=False,
            ).logits
            nxt = int(logits[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_shipped_model_is_small_and_loads(shipped: Gemma4Unified) -> None:
    from rawcast.model.loader import BUNDLED_DIR

    size = sum(f.stat().st_size for f in (BUNDLED_DIR / "rawcast-tiny").iterdir())
    assert size <= 40 * 2**20
    assert (
        shipped.tokenizer is not None
        and shipped.tokenizer.vocab_size == shipped.cfg.text.vocab_size
    )


def test_transformers_gives_the_same_greedy_transcript(shipped: Gemma4Unified) -> None:
    """transformers loads the shipped checkpoint and decodes the fixture to the same tokens."""
    pytest.importorskip("transformers")
    from rawcast.model.loader import BUNDLED_DIR
    from rawcast.model.prompt import PromptFormat

    audio = _read(CLIP)
    # plain greedy on both sides: no loop stop, the same token budget
    ours = decode.greedy(shipped, "transcribe", audio=audio, max_new=40, loop_rule=None)
    assert shipped.tokenizer is not None
    fmt = PromptFormat(shipped.tokenizer)
    frames = torch.from_numpy(T.frames(audio))
    head, branch = decode.prompt_ids(fmt, frames.shape[0], "transcribe")
    theirs = _hf_greedy(BUNDLED_DIR / "rawcast-tiny", head + branch, frames, set(fmt.stop_ids))
    assert ours == theirs


def test_caption_corruption_feeds_other_colours_and_keeps_the_true_caption(
    shipped: Gemma4Unified,
) -> None:
    """``--caption-corrupt``: the model reads another colour in place of a colour word
    while every target stays the true caption (so the shape after it is learned from the
    picture); share 0 reads the caption itself; the same scene gives the same swaps."""
    from rawcast.model.prompt import PromptFormat

    assert shipped.tokenizer is not None
    fmt = PromptFormat(shipped.tokenizer)
    colours = T.colour_ids(fmt)
    assert len(colours) == len(scenes.COLOURS)
    swapped = 0
    for i in range(12):
        ex = T.caption_example(fmt, 1234, i, np.random.default_rng(i), corrupt=1.0)
        plain = T.caption_example(fmt, 1234, i, np.random.default_rng(i), corrupt=0.0)
        again = T.caption_example(fmt, 1234, i, np.random.default_rng(i), corrupt=1.0)
        assert plain.inputs is None and ex.tokens == plain.tokens
        assert ex.inputs is not None and ex.inputs == again.inputs
        assert len(ex.inputs) == len(ex.tokens)
        for j, (true, read) in enumerate(zip(ex.tokens, ex.inputs, strict=True)):
            if true in colours:
                assert j >= ex.loss_from and read in colours and read != true
                swapped += 1
            else:
                assert read == true
        p, labels = T.pack_batch(shipped, [ex])
        n = len(ex.tokens)
        assert p.input_ids[0, ex.loss_from : n].tolist() == ex.inputs[ex.loss_from :]
        assert labels[0, ex.loss_from - 1 : n - 1].tolist() == ex.tokens[ex.loss_from :]
    assert swapped >= 12  # every caption names at least one colour


def test_channel_augment_keeps_timing_and_loudness_and_recolours_the_spectrum() -> None:
    """``bench/frontend.py --augment``: a random channel keeps the clip's length and RMS,
    is a function of its generator, moves the energy of some mel band by more than
    3 dB, and share 0 leaves the clip as stored."""
    x = (np.random.default_rng(0).standard_normal(32_000) * 0.1).astype(np.float32)
    edges = T.mel_grid(9, 100, 7900)
    freqs = np.fft.rfftfreq(x.size, 1 / 16_000)

    def bands(a: np.ndarray) -> np.ndarray:
        power = np.abs(np.fft.rfft(a)) ** 2
        return np.array([power[(freqs >= lo) & (freqs < hi)].sum()
                         for lo, hi in itertools.pairwise(edges)])  # fmt: skip

    for seed in range(4):
        y = T.channel_augment(x, np.random.default_rng(seed), 1.0)
        assert y.shape == x.shape and y.dtype == np.float32
        assert np.array_equal(y, T.channel_augment(x, np.random.default_rng(seed), 1.0))
        assert np.sqrt((y**2).mean()) == pytest.approx(np.sqrt((x**2).mean()), rel=0.02)
        assert np.abs(10 * np.log10(bands(y) / bands(x))).max() > 3.0
    assert T.channel_augment(x, np.random.default_rng(0), 0.0) is x


def test_shipped_model_transcribes_a_held_out_voice(shipped: Gemma4Unified) -> None:
    """A clip by festival's ked voice (never in training), held-out sentence. The shipped
    checkpoint (phase 13) says "he finds my box" (phase 12 said "he finds my cold box",
    every word, phase 11 "he finds my balls", phase 10 "he finds four cold doors", phase 8
    "he finds the box", phase 7 "he studies at home at night"): one clip; held-out WER
    over all of them is still 54.5 %."""
    ref = json.loads(CLIP.with_suffix(".json").read_text())["text"]
    hyp = decode.transcribe(shipped, _read(CLIP))
    assert wer([ref], [hyp]) <= FIXTURE_MAX_WER, hyp


def test_cli_has_train_and_eval() -> None:
    from rawcast.transports.cli import build_parser

    args = build_parser().parse_args(["train", "--steps", "5", "--max-minutes", "1"])
    assert args.command == "train" and args.steps == 5
    assert build_parser().parse_args(["eval", "--max-clips", "3"]).max_clips == 3
    phase = build_parser().parse_args(
        ["train", "--init-from", "runs/a", "--task-mix", "1,1,2", "--lr", "5e-4"]
    )
    assert phase.task_mix == (0.25, 0.25, 0.5) and phase.lr == 5e-4
    assert phase.init_from == Path("runs/a") and phase.vision_weight == 0.5
    assert build_parser().parse_args(["train", "--vision-weight", "2"]).vision_weight == 2.0
    assert phase.voice_shift == 0.0
    assert build_parser().parse_args(["train", "--voice-shift", "0.5"]).voice_shift == 0.5
    assert phase.ctc_weight == 1.0 == T.TrainConfig().ctc_weight
    assert build_parser().parse_args(["train", "--ctc-weight", "3"]).ctc_weight == 3.0


def test_train_flags_reach_the_training_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``rawcast train`` parses is what the training loop gets (no data made here)."""
    from rawcast.transports.cli import build_parser

    got: list[T.TrainConfig] = []
    procs_seen: list[int] = []
    prefetch_seen: list[int] = []
    monkeypatch.setattr(D, "generate", lambda *a, **k: [])
    monkeypatch.setattr(D, "content_hash", lambda paths: "0" * 16)

    def train(root: Path, run: Path, out: Path, cfg: T.TrainConfig, dcfg: D.DataConfig, log: Any,
              procs: int, prefetch: int) -> None:  # fmt: skip
        got.append(cfg)
        procs_seen.append(procs)
        prefetch_seen.append(prefetch)

    monkeypatch.setattr(T, "train", train)
    flags = "--ctc-weight 3 --vision-weight 2 --voice-shift 0.25 --task-mix 1,0,1 --lr 1e-3"
    flags += " --procs 2 --voice-warp 0.4 --prefetch 3 --channel 0.3"
    flags += " --caption-corrupt 0.5 --count-weight 0.5 --average-last 5"
    shape = "--layers 6 --hidden 128 --intermediate 384 --ctc-layer 3"
    args = build_parser().parse_args(["train", *flags.split(), *shape.split(), "--out", "x"])
    assert args.func(args) == 0
    (cfg,) = got
    assert (cfg.ctc_weight, cfg.vision_weight, cfg.voice_shift) == (3.0, 2.0, 0.25)
    assert cfg.caption_corrupt == 0.5 and T.TrainConfig().caption_corrupt == 0.0
    assert cfg.count_weight == 0.5 and T.TrainConfig().count_weight == 0.0
    assert cfg.task_mix == (0.5, 0.0, 0.5) and cfg.lr == 1e-3
    assert (cfg.layers, cfg.hidden, cfg.intermediate, cfg.ctc_layer) == (6, 128, 384, 3)
    assert procs_seen == [2] and cfg.voice_warp == 0.4 and T.TrainConfig().voice_warp == 0.0
    assert prefetch_seen == [3] and cfg.channel == 0.3 and T.TrainConfig().channel == 0.0
    assert cfg.average_last == 5 and T.TrainConfig().average_last == 0
    defaults = build_parser().parse_args(["train"])
    assert defaults.procs == 1 and defaults.prefetch == 0
    assert (defaults.layers, defaults.hidden, defaults.intermediate, defaults.ctc_layer) == (
        T.TrainConfig().layers, T.TrainConfig().hidden, T.TrainConfig().intermediate,
        T.TrainConfig().ctc_layer,
    )  # fmt: skip


def test_a_ctc_layer_past_the_model_exits_2_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawcast.transports.cli import main

    monkeypatch.setattr(D, "generate", lambda *a, **k: [])
    monkeypatch.setattr(D, "content_hash", lambda paths: "0" * 16)
    assert main(["train", "--layers", "3", "--ctc-layer", "3", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rawcast train: the CTC layer (3) must be below the layers (3)"]
    assert main(["train", "--procs", "3", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rawcast train: --batch 16 does not split into --procs 3 equal shares"]


@pytest.mark.parametrize(
    "flags", ["--layers 1", "--hidden 32", "--ctc-layer -1", "--layers x", "--procs 0"]
)
def test_a_bad_model_shape_exits_2(flags: str, capsys: pytest.CaptureFixture[str]) -> None:
    from rawcast.transports.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", *flags.split()])
    assert e.value.code == 2
    assert "give a whole number >=" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--vision-weight", "--ctc-weight"])
@pytest.mark.parametrize("weight", ["-1", "x", "nan"])
def test_a_bad_loss_weight_exits_2(
    flag: str, weight: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawcast.transports.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", flag, weight])
    assert e.value.code == 2
    assert "give a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("mix", ["1,2", "a,b,c", "1,-1,1", "0,0,0"])
def test_a_bad_task_mix_exits_2_saying_what_to_give(
    mix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawcast.transports.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--task-mix", mix])
    assert e.value.code == 2
    assert "three non-negative shares for transcribe,translate,caption" in capsys.readouterr().err


SMALL: dict[str, Any] = dict(
    batch=2, export_every=1, layers=2, hidden=64, intermediate=128, threads=1, ctc_layer=1
)


def _training_slice(root: Path) -> D.DataConfig:
    """Four generated training clips of grammar sentences under ``root``."""
    _write_sentences(root, 40)
    dcfg = D.DataConfig(seed=7, train_clips=4, eval_clips_per_voice=0)
    D.generate(root, dcfg, workers=1, splits=("train",))
    return dcfg


@needs_espeak
def test_train_resumes_and_exports_a_loadable_checkpoint(tmp_path: Path) -> None:
    """The recipe's training loop on a tiny slice: it exports a checkpoint rawcast loads,
    and a second call with more steps resumes from the saved state (as the shipped
    rawcast-tiny's second cycle did) instead of starting over."""
    from rawcast.model.loader import load

    dcfg = _training_slice(tmp_path)
    logs: list[str] = []
    for steps in (2, 3):
        T.train(tmp_path, tmp_path / "run", tmp_path / "out", T.TrainConfig(steps=steps, **SMALL),
                dcfg, log=logs.append)  # fmt: skip
        assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == steps
    assert any(line.startswith("resumed from") and "at step 2" in line for line in logs)
    sizes = [line for line in logs if line.startswith("model: 2 layers, hidden 64, ")]
    assert sizes and all(line.endswith("MB in fp32") for line in sizes)  # under the bound
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    model = load(tmp_path / "out")
    assert model.tokenizer is not None and model.cfg.text.num_hidden_layers == 2

    # A second phase starts from the run's weights and heads (or from the exported
    # checkpoint, heads fresh) with a fresh optimizer; an older run without the vision
    # head is refused by name instead of failing inside load_state_dict.
    saved = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    fresh = T.build(tmp_path, T.TrainConfig(**SMALL), dcfg)
    for src in (tmp_path / "run", tmp_path / "out"):
        tr = T.build(tmp_path, T.TrainConfig(init_from=str(src), **SMALL), dcfg)
        for k, v in tr.model.state_dict().items():
            assert torch.equal(v, saved["model"][k]), k
        for name, attr in (("head", "head"), ("vision_head", "vhead")):
            want = saved[name] if src.name == "run" else getattr(fresh, attr).state_dict()
            got = getattr(tr, attr).state_dict()
            assert all(torch.equal(v, want[k]) for k, v in got.items()), (src.name, name)
        assert not tr.opt.state
    # A phase over more clips may label more phones: a CTC head trained on another
    # inventory starts afresh (one logged line) while the rest carries over; a run from
    # before the inventory was saved keeps its head where the size matches.
    labels_file = tmp_path / "run" / T.CTC_LABELS
    labels = json.loads(labels_file.read_text())
    assert labels == T.ctc_inventory(fresh.lex) and len(labels) > 1
    for stored, kept in ((labels[::-1], False), (None, True), (labels, True)):
        if stored is None:
            labels_file.unlink()
        else:
            labels_file.write_text(json.dumps(stored))
        notes: list[str] = []
        tr = T.build(tmp_path, T.TrainConfig(init_from=str(tmp_path / "run"), **SMALL), dcfg,
                     log=notes.append)  # fmt: skip
        want = saved["head"]["weight"] if kept else fresh.head.weight
        assert torch.equal(tr.head.weight, want) and torch.equal(
            tr.vhead.weight, saved["vision_head"]["weight"]
        )
        assert bool(notes) != kept and all("CTC head starts afresh" in n for n in notes)
    # Resuming the run itself over data that labels otherwise is refused in one line.
    labels_file.write_text(json.dumps(labels[:-1]))
    with pytest.raises(T.RunError, match=r"trained its CTC head on \d+ .* --init-from"):
        T.train(tmp_path, tmp_path / "run", tmp_path / "out", T.TrainConfig(steps=4, **SMALL),
                dcfg)  # fmt: skip
    labels_file.write_text(json.dumps(labels))
    # The data directory made again may number the same tokens otherwise: a run keeps
    # its own tokenizer (saved in the run dir) and a second phase takes its source's.
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (
        tmp_path / "out" / "tokenizer.json"
    ).read_text()
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (20, 21))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shipped_id = load(tmp_path / "out").tokenizer.token_id(a)
    assert T.load_tokenizer(tmp_path, dcfg).token_id(a) != shipped_id
    for src in (tmp_path / "run", tmp_path / "out"):
        tr = T.build(tmp_path, T.TrainConfig(init_from=str(src), **SMALL), dcfg)
        assert tr.fmt.tok.token_id(a) == shipped_id, src.name
    assert (
        T.build(tmp_path, T.TrainConfig(**SMALL), dcfg, tmp_path / "run").fmt.tok.token_id(a)
        == shipped_id
    )
    wider = T.TrainConfig(init_from=str(tmp_path / "run"), **{**SMALL, "hidden": 96})
    with pytest.raises(T.RunError, match="another model shape than this run"):
        T.build(tmp_path, wider, dcfg)
    del saved["vision_head"]
    (tmp_path / "old").mkdir()
    torch.save(saved, tmp_path / "old" / "state.pt")
    with pytest.raises(RuntimeError, match=r"has no vision_head.*--init-from"):
        T.train(tmp_path, tmp_path / "old", tmp_path / "out2", T.TrainConfig(steps=4, **SMALL),
                dcfg)  # fmt: skip


@needs_espeak
def test_a_count_run_trains_and_saves_its_count_head(tmp_path: Path) -> None:
    """``--count-weight``: the run adds the count loss on caption batches, trains a
    count head that ``state.pt`` keeps (a resume needs it), and a next phase starts from
    it; without the flag no count head is made, so older runs resume as before."""
    dcfg = _training_slice(tmp_path)
    cfg = T.TrainConfig(steps=2, count_weight=1.0, task_mix=(0.0, 0.0, 1.0), **SMALL)
    tr = T.build(tmp_path, cfg, dcfg)
    assert tr.chead is not None and T.build(tmp_path, T.TrainConfig(**SMALL), dcfg).chead is None
    before = tr.chead.weight.detach().clone()
    vals, _ = tr.step(tr.batch(0), 1e-3)
    assert vals["count"] > 0 and vals["loss"] > vals["ce"] + vals["count"] - 1e-6
    assert not torch.equal(before, tr.chead.weight)
    T.train(tmp_path, tmp_path / "run", tmp_path / "out", cfg, dcfg, log=lambda _: None)
    saved = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert set(saved["count_head"]) == {"weight", "bias"}
    nxt = T.build(tmp_path, T.TrainConfig(**{**SMALL, "count_weight": 1.0},
                                          init_from=str(tmp_path / "run")), dcfg)  # fmt: skip
    assert nxt.chead is not None
    assert torch.equal(nxt.chead.weight.cpu(), saved["count_head"]["weight"])


@needs_espeak
def test_voice_shift_changes_the_audio_of_a_batch_and_nothing_else(tmp_path: Path) -> None:
    """With ``voice_shift`` the same step's batch has the same tasks and targets (and the
    images), only its speech resampled; the batch is still a function of the step."""
    dcfg = _training_slice(tmp_path)
    tr = T.build(tmp_path, T.TrainConfig(**SMALL), dcfg)
    shifted = T.TrainConfig(**{**SMALL, "batch": 8}, voice_shift=1.0)
    plain = T.TrainConfig(**{**SMALL, "batch": 8})
    for step in range(3):
        a = T.make_batch(tr.fmt, tr.corpus, plain, step, tr.lex)
        b = T.make_batch(tr.fmt, tr.corpus, shifted, step, tr.lex)
        again = T.make_batch(tr.fmt, tr.corpus, shifted, step, tr.lex)
        assert [e.tokens[e.loss_from :] for e in a] == [e.tokens[e.loss_from :] for e in b]
        assert [e.ctc for e in a] == [e.ctc for e in b]
        for x, y, z in zip(a, b, again, strict=True):
            assert y.tokens == z.tokens
            assert x.task == y.task
            if x.task == "caption":  # its trailing noise frames are not speech
                assert (x.audio is None and y.audio is None) or np.array_equal(x.audio, y.audio)
            else:
                assert x.audio is not None and y.audio is not None
                assert x.audio.shape != y.audio.shape or not np.array_equal(x.audio, y.audio)


@needs_espeak
def test_channel_changes_the_speech_of_a_batch_and_keeps_its_timing(tmp_path: Path) -> None:
    """``rawcast train --channel``: the same step's batch, the same tasks, targets and
    alignment windows (the filter moves nothing in time), each speech example's audio
    through a random channel (same length, other samples), drawn from a stream of its
    own so that the rest of the batch is the run's without it."""
    dcfg = _training_slice(tmp_path)
    tr = T.build(tmp_path, T.TrainConfig(**SMALL), dcfg)
    flags: dict[str, Any] = {**SMALL, "batch": 8, "align_weight": 0.5, "voice_shift": 0.5}
    plain = T.TrainConfig(**flags)
    channel = T.TrainConfig(**flags, channel=1.0)
    changed = speech = 0
    for step in range(3):
        a = T.make_batch(tr.fmt, tr.corpus, plain, step, tr.lex)
        b = T.make_batch(tr.fmt, tr.corpus, channel, step, tr.lex)
        again = T.make_batch(tr.fmt, tr.corpus, channel, step, tr.lex)
        for x, y, z in zip(a, b, again, strict=True):
            assert (x.task, x.tokens, x.ctc, x.align) == (y.task, y.tokens, y.ctc, y.align)
            assert y.audio is None or (z.audio is not None and np.array_equal(y.audio, z.audio))
            if x.task == "caption":
                continue
            assert x.audio is not None and y.audio is not None
            assert x.audio.shape == y.audio.shape
            changed += not np.array_equal(x.audio, y.audio)
            speech += 1
    assert speech > 0 and changed == speech  # --channel 1: every one


@needs_espeak
def test_mixed_examples_put_both_modalities_in_one_segment(tmp_path: Path) -> None:
    """``--mixed``: a transcription or translation gets a camera frame's patch grid amid
    its audio and a caption gets speech before its picture (a call with a camera, as the
    engine interleaves them); the targets and the CTC labels stay those of the plain batch,
    every audio and image placeholder has its frame or cell, each transcript token's
    guided-alignment window covers the same audio frames (never the picture), and the
    step trains."""
    dcfg = _training_slice(tmp_path)
    tr = T.build(tmp_path, T.TrainConfig(**SMALL, align_weight=0.5), dcfg)
    ids = tr.fmt.tok.ids
    plain = T.TrainConfig(**{**SMALL, "batch": 8, "align_weight": 0.5})
    mixed = T.TrainConfig(**{**SMALL, "batch": 8, "align_weight": 0.5}, mixed=1.0)
    tasks, aligned = set(), 0

    def on_target(ex: T.Example) -> list[list[int]]:
        """Each target token's on-target keys in the training forward's targets, as
        indices among the row's audio frames."""
        t = T.align_targets(T.pack_batch(tr.model, [ex])[0], [ex])
        assert t is not None
        audio_pos = [i for i, tok in enumerate(ex.tokens) if tok == ids.audio]
        keys = [row.nonzero().flatten().tolist() for row in t.window[0]]
        assert all(k in audio_pos for row in keys for k in row)
        return [[audio_pos.index(k) for k in row] for row in keys if row]

    for step in range(3):
        a = T.make_batch(tr.fmt, tr.corpus, plain, step, tr.lex)
        b = T.make_batch(tr.fmt, tr.corpus, mixed, step, tr.lex)
        again = T.make_batch(tr.fmt, tr.corpus, mixed, step, tr.lex)
        assert [e.tokens for e in b] == [e.tokens for e in again]
        unaligned = T.make_batch(tr.fmt, tr.corpus, replace(mixed, mixed_align=False), step,
                                 tr.lex)  # fmt: skip  # --mixed-align off: the shipped phases
        assert [e.tokens for e in unaligned] == [e.tokens for e in b]
        assert not any(e.align for e in unaligned)
        for x, y in zip(a, b, strict=True):
            tasks.add(x.task)
            assert x.task == y.task and x.ctc == y.ctc
            assert x.tokens[x.loss_from :] == y.tokens[y.loss_from :]
            assert y.image is not None and y.audio is not None
            assert y.tokens.count(ids.image) == y.image[0].shape[0]
            assert y.tokens.count(ids.audio) == y.audio.shape[0]
            if x.task == "caption":  # speech frames before the picture, nothing else new
                assert y.audio.shape[0] > (0 if x.audio is None else x.audio.shape[0])
                assert [t for t in y.tokens if t != ids.audio] == [
                    t for t in x.tokens if t != ids.audio
                ]
                assert y.tokens.index(ids.audio) < y.tokens.index(ids.image)
            else:  # one image block amid the same audio
                assert x.audio is not None and np.array_equal(x.audio, y.audio)
                i = y.tokens.index(ids.boi)
                j = y.tokens.index(ids.eoi)
                assert y.tokens[i - 1] == ids.eoa and y.tokens[j + 1] == ids.boa
                assert y.tokens[: i - 1] + y.tokens[j + 2 :] == x.tokens
                assert y.align == x.align
                if x.align:
                    aligned += 1
                    assert on_target(y) == on_target(x)
                    with_window = y
    assert tasks == {"transcribe", "translate", "caption"} and aligned
    vals, _ = tr.step([with_window, *b[1:]], 1e-3)
    assert all(math.isfinite(v) for v in vals.values()) and vals["ctc"] > 0 and vals["align"] > 0


@needs_espeak
def test_draw_from_trains_on_the_batches_of_later_steps(tmp_path: Path) -> None:
    """``--draw-from N``: step k's batch is the plain run's batch of step N + k, so a
    phase started from an earlier run sees examples that run did not."""
    dcfg = _training_slice(tmp_path)
    tr = T.build(tmp_path, T.TrainConfig(**SMALL), dcfg)
    plain = T.TrainConfig(**{**SMALL, "batch": 4})
    later = T.TrainConfig(**{**SMALL, "batch": 4}, draw_from=5)
    for k in range(2):
        want = T.make_batch(tr.fmt, tr.corpus, plain, 5 + k, tr.lex)
        got = T.make_batch(tr.fmt, tr.corpus, later, k, tr.lex)
        assert [e.tokens for e in got] == [e.tokens for e in want]
    first = T.make_batch(tr.fmt, tr.corpus, plain, 0, tr.lex)
    assert [e.tokens for e in first] != [e.tokens for e in T.make_batch(
        tr.fmt, tr.corpus, later, 0, tr.lex)]  # fmt: skip


@needs_espeak
def test_bf16_training_step_tracks_fp32(tmp_path: Path) -> None:
    """``rawcast train --precision bf16``: the same model and batches give losses within
    bf16's rounding of fp32's, the weights and AdamW state stay fp32, and the forward
    really ran in bf16 (the losses are not fp32's bit for bit)."""
    dcfg = _training_slice(tmp_path)
    runs = {}
    for prec in T.PRECISIONS:
        tr = T.build(tmp_path, T.TrainConfig(precision=prec, **SMALL), dcfg)
        runs[prec] = (tr, [tr.step(tr.batch(step), 1e-3)[0]["loss"] for step in range(3)])
    fp32, bf16 = runs["fp32"][1], runs["bf16"][1]
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert bf16 != fp32
    tr = runs["bf16"][0]
    assert all(p.dtype == torch.float32 for p in tr.params)
    assert all(v.dtype == torch.float32 for st in tr.opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)  # fmt: skip


def test_voices_are_drawn_by_engine_share() -> None:
    """flite's few voices speak ``flite_share`` of the training clips, not 4 %."""
    voices = [speech.Voice("espeak-ng", f"en+m{i}") for i in range(20)]
    voices += [speech.Voice("flite", "kal"), speech.Voice("flite", "slt")]
    rng = np.random.default_rng(0)
    picks = [D.pick_voice(voices, rng, 0.5) for _ in range(2000)]
    share = sum(v.engine == "flite" for v in picks) / len(picks)
    assert 0.45 < share < 0.55
    assert {v.name for v in picks if v.engine == "flite"} == {"kal", "slt"}
    assert not any(D.pick_voice(voices, rng, 0.0).engine == "flite" for _ in range(200))
    only_espeak = voices[:20]
    assert len({D.pick_voice(only_espeak, rng, 0.5).name for _ in range(400)}) == 20


def test_data_of_another_config_is_not_extended(tmp_path: Path) -> None:
    """A data directory made under one config refuses shards of another (they would mix
    silently); only the number of training clips may change."""
    _write_sentences(tmp_path, 8)
    cfg = D.DataConfig(seed=7, train_clips=0, eval_clips_per_voice=0)
    D.generate(tmp_path, cfg, splits=("train",))
    D.generate(tmp_path, D.DataConfig(seed=7, train_clips=500, eval_clips_per_voice=0), splits=())
    with pytest.raises(ValueError, match=r"another config \(flite_share differ\)"):
        D.generate(tmp_path, D.DataConfig(seed=7, train_clips=0, eval_clips_per_voice=0,
                                          flite_share=0.2))  # fmt: skip


def test_a_corpus_reads_only_the_shards_of_its_clips(tmp_path: Path) -> None:
    """A data directory extended for a later phase (``train_clips`` 10 500 -> 30 000, the
    first shards unchanged) must not change what a run made with the smaller config
    trains on: its corpus stops at the shards its clips fill."""

    def clip(i: int) -> D.Clip:
        return D.Clip(np.full(8, i / 1000, np.float32), f"w{i}", "", [8], "v", "", "grammar")

    for k in range(3):
        D.save_shard(tmp_path / f"train-{k:04d}.npz", [clip(k * 10 + j) for j in range(2)])
    texts = lambda c: sorted(m["text"] for s in c.shards for m in s.meta)  # noqa: E731
    assert texts(T.Corpus(tmp_path, D.SHARD + 1)) == ["w0", "w1", "w10", "w11"]
    assert texts(T.Corpus(tmp_path, D.SHARD)) == ["w0", "w1"]
    assert len(T.Corpus(tmp_path)) == 6  # no config: every shard
    grown = T.Corpus(tmp_path, 1)
    D.save_shard(tmp_path / "train-0003.npz", [clip(30)])
    grown.refresh()  # a run's periodic refresh still ignores the others' shards
    assert texts(grown) == ["w0", "w1"]


@needs_espeak
def test_prefetched_batches_train_the_same_run(tmp_path: Path) -> None:
    """``rawcast train --prefetch`` makes the batches on a background thread while a step
    trains: the run it trains (every weight, every logged loss) is the one without it."""
    dcfg = _training_slice(tmp_path)
    cfg = T.TrainConfig(steps=3, mixed=0.5, voice_shift=0.5, **SMALL)
    weights, losses = {}, {}
    for prefetch in (0, 2):
        run = tmp_path / f"run{prefetch}"
        T.train(tmp_path, run, tmp_path / f"out{prefetch}", cfg, dcfg, log=lambda _: None,
                prefetch=prefetch)  # fmt: skip
        weights[prefetch] = torch.load(run / "state.pt", weights_only=False)["model"]
        logged = (run / "log.jsonl").read_text().splitlines()
        losses[prefetch] = [json.loads(x)["loss"] for x in logged]
    assert len(losses[0]) == 3 and losses[0] == losses[2]
    assert weights[0].keys() == weights[2].keys()
    for k, v in weights[0].items():
        assert torch.equal(v, weights[2][k]), k


def test_tail_average_keeps_the_last_scheduled_saves() -> None:
    """``--average-last N`` averages the run's last N scheduled saves: every
    ``export_every`` steps and the last step, whichever the run's length."""
    assert TailAverage(Path("t"), 5, 200, 5000).kept == [4200, 4400, 4600, 4800, 5000]
    assert TailAverage(Path("t"), 3, 200, 5100).kept == [4800, 5000, 5100]
    assert TailAverage(Path("t"), 4, 200, 300).kept == [200, 300]
    off = TailAverage(Path("t"), 1, 200, 5000)
    assert not off.on and off.kept == []


@needs_espeak
def test_average_last_exports_the_mean_of_the_last_saves(tmp_path: Path) -> None:
    """``rawcast train --average-last 2``: the export is the mean of the weights at the
    last two saves (the step-2 snapshot is the weights a 2-step run ends with), while the
    run's own state keeps the trained weights for the next phase."""
    from rawcast.model.loader import load

    dcfg = _training_slice(tmp_path)
    quiet = lambda _: None  # noqa: E731
    T.train(tmp_path, tmp_path / "plain", tmp_path / "out-plain",
            T.TrainConfig(steps=2, **SMALL), dcfg, log=quiet)  # fmt: skip
    T.train(tmp_path, tmp_path / "run", tmp_path / "out",
            T.TrainConfig(steps=3, average_last=2, **SMALL), dcfg, log=quiet)  # fmt: skip
    snaps = sorted((tmp_path / "run" / "tail").glob("*.pt"))
    assert [p.name for p in snaps] == ["00000002.pt", "00000003.pt"]
    at2, at3 = (torch.load(p, weights_only=True) for p in snaps)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)["model"]
    plain = load(tmp_path / "out-plain").state_dict()
    exported = load(tmp_path / "out").state_dict()
    moved = 0
    for k, v in exported.items():
        assert torch.equal(at2[k], plain[k]), k
        assert torch.equal(at3[k], state[k]), k
        mean = ((at2[k].double() + at3[k].double()) / 2).float()
        assert torch.allclose(v, mean, rtol=0, atol=1e-7), k
        moved += not torch.equal(at2[k], at3[k])
    assert moved > 0  # the two saves differ, so the mean is neither of them
