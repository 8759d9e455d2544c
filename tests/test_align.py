"""Guided alignment (model/recipe/align.py): windows, the loss, and its place in training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rawcast.model.loader import load
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import align as A
from rawcast.model.recipe import data as D
from rawcast.model.recipe import train as T
from rawcast.model.recipe.config import tiny_config
from rawcast.model.tokenizer import Tokenizer

TEXT = "the children open a black car"
RATE = 16_000


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load("rawcast-tiny").tokenizer


def _ends(words: list[str], start: int = 8000, per_char: int = 1200) -> list[int]:
    out, t = [], start
    for w in words:
        t += per_char * len(w)
        out.append(t)
    return out


def test_each_token_gets_the_window_of_its_word(tok: Tokenizer) -> None:
    words = TEXT.split()
    ends = _ends(words)
    n_frames = ends[-1] // 640 + 10
    ids = tok.encode(TEXT)
    owner = A.token_words(tok.encode, words)
    assert len(owner) == len(ids) and owner == sorted(owner) and set(owner) == set(range(6))
    wins = A.token_windows(tok.encode, TEXT, ends, n_frames)
    assert len(wins) == len(ids)
    word_wins = A.frame_windows(A.word_spans(words, ends), n_frames)
    for j, k in enumerate(owner):
        lo, hi = wins[j]
        assert (lo, hi) == word_wins[k]
        assert 0 <= lo < hi <= n_frames
        # the word's own frames are inside its window
        start = ends[k - 1] if k else ends[0] - 1200 * len(words[0])
        assert lo <= start // 640 and ends[k] // 640 < hi
    # windows move forward with the words
    assert [w[0] for w in word_wins] == sorted(w[0] for w in word_wins)


def test_too_few_word_times_give_no_windows(tok: Tokenizer) -> None:
    assert A.token_windows(tok.encode, TEXT, _ends(TEXT.split())[:3], 100) == []
    assert A.token_windows(tok.encode, "", [], 100) == []


def _targets(width: int, first: int, offset: int, wins: list[tuple[int, int]]) -> A.Targets:
    t = A.Targets.build(width, {0: (first, offset, wins)}, 1, torch.device("cpu"))
    assert t is not None
    return t


def test_an_image_block_amid_the_frames_moves_the_later_windows_and_is_never_on_target() -> None:
    """Frames 0-9 at positions 2-11 with a 5-position image block before frame 4: frame f
    sits at 2 + f, or 7 + f from frame 4 on; a word over frames 3-5 straddles the block."""
    t = A.Targets.build(32, {0: (20, 2, [(0, 3), (3, 6), (6, 10)])}, 1, torch.device("cpu"),
                        {0: (4, 5)})  # fmt: skip
    assert t is not None
    on = [t.window[0, q].nonzero().flatten().tolist() for q in (20, 21, 22)]
    assert on == [[2, 3, 4], [5, 11, 12], [13, 14, 15, 16]]
    assert t.rows[0].nonzero().flatten().tolist() == [20, 21, 22]


def test_loss_is_minus_log_of_the_window_share_under_uniform_attention() -> None:
    width, first, offset = 24, 16, 2
    wins = [(0, 4), (3, 9)]
    targets = _targets(width, first, offset, wins)
    causal = torch.ones(width, width, dtype=torch.bool).tril().view(1, 1, width, width)
    q = torch.zeros(1, 4, width, 8)
    k = torch.zeros(1, 2, width, 8)
    got = A.loss(q, k, causal, targets, heads=2)
    # position 16 sees 17 keys, 4 of them in its window; position 17 sees 18, 6 inside
    want = -(math.log(4 / 17) + math.log(6 / 18)) / 2
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(A.uniform_loss(causal, targets)) == pytest.approx(want, rel=1e-6)


def test_loss_vanishes_when_the_heads_look_at_the_word() -> None:
    width, first, offset = 24, 16, 2
    wins = [(1, 3)]
    targets = _targets(width, first, offset, wins)
    causal = torch.ones(width, width, dtype=torch.bool).tril().view(1, 1, width, width)
    q = torch.zeros(1, 4, width, 8)
    k = torch.zeros(1, 1, width, 8)
    q[0, :, first, 0] = 10.0
    k[0, 0, offset + 1 : offset + 3, 0] = 10.0  # score 100 inside, 0 elsewhere
    assert float(A.loss(q, k, causal, targets, heads=4)) < 1e-6
    # heads past ``heads`` are not scored: a head looking elsewhere costs nothing
    q[0, 2:, first, 0] = -10.0
    assert float(A.loss(q, k, causal, targets, heads=2)) < 1e-6
    assert float(A.loss(q, k, causal, targets, heads=4)) > 10


def _corpus(tmp_path: Path) -> T.Corpus:
    """One in-memory shard of two clips with word end times (no TTS needed)."""
    rng = np.random.default_rng(0)
    texts = [TEXT, "he finds my cold box"]
    audio, offsets, ends, end_offsets = [], [0], [], [0]
    for t in texts:
        e = _ends(t.split())
        n = e[-1] + 8000
        audio.append((rng.standard_normal(n) * 3000).astype(np.int16))
        offsets.append(offsets[-1] + n)
        ends.extend(e)
        end_offsets.append(len(ends))
    meta = [{"text": t, "es": "el texto", "source": "grammar"} for t in texts]
    shard = D.Shard(
        np.concatenate(audio), np.array(offsets), np.array(ends), np.array(end_offsets), meta
    )
    corpus = T.Corpus(tmp_path)
    corpus.shards = [shard]
    return corpus


def test_only_transcription_examples_carry_windows(tok: Tokenizer, tmp_path: Path) -> None:
    fmt = PromptFormat(tok)
    corpus = _corpus(tmp_path)
    on = T.TrainConfig(batch=12, align_weight=1.0, task_mix=(0.5, 0.5, 0.0))
    off = T.TrainConfig(batch=12, task_mix=(0.5, 0.5, 0.0))
    with_align = T.make_batch(fmt, corpus, on, 3)
    without = T.make_batch(fmt, corpus, off, 3)
    assert {ex.task for ex in with_align} == {"transcribe", "translate"}
    for a, b in zip(with_align, without, strict=True):
        assert a.tokens == b.tokens  # the batches themselves are unchanged
        assert not b.align
        if a.task == "transcribe" and a.loss_from < len(a.tokens) - 1:
            assert len(a.align) == len(a.tokens) - 1 - a.loss_from
            assert a.tokens[a.audio_at - 1] == tok.ids.boa and a.tokens[a.audio_at] == tok.ids.audio
            assert all(hi <= a.audio.shape[0] for _, hi in a.align)
        else:
            assert not a.align


def test_the_loss_moves_only_the_layers_it_guides(tok: Tokenizer, tmp_path: Path) -> None:
    """Its gradient reaches the guided layer and those below, never the layers above, and
    a few steps of it alone put more of the attention on the words."""
    torch.manual_seed(0)
    fmt = PromptFormat(tok)
    model = T.Gemma4Unified(tiny_config(tok.vocab_size, layers=3, hidden=64, intermediate=128))
    model.tokenizer = tok
    head = torch.nn.Linear(64, 8)
    cfg = T.TrainConfig(
        batch=4, align_weight=1.0, align_layers=(1,), task_mix=(1.0, 0.0, 0.0), ctc_layer=1
    )
    batch = T.make_batch(fmt, _corpus(tmp_path), cfg, 0)
    out = T.losses(model, head, batch, cfg)
    assert "align" in out
    out["align"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.2.self_attn.q_proj.weight"] is None
    assert grads["layers.1.self_attn.q_proj.weight"] is not None
    assert float(grads["layers.1.self_attn.q_proj.weight"].abs().sum()) > 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(out["align"].detach())
    for _ in range(15):
        opt.zero_grad()
        T.losses(model, head, batch, cfg)["align"].backward()
        opt.step()
    assert float(T.losses(model, head, batch, cfg)["align"].detach()) < 0.7 * first


def test_align_flags_reach_the_training_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from rawcast.transports.cli import build_parser

    got: list[T.TrainConfig] = []
    monkeypatch.setattr(D, "generate", lambda *a, **k: [])
    monkeypatch.setattr(D, "content_hash", lambda paths: "0" * 16)
    monkeypatch.setattr(T, "train", lambda root, run, out, cfg, dcfg, **k: got.append(cfg))
    flags = "train --align-weight 0.5 --align-layers 2,-1 --align-heads 3 --out x".split()
    args = build_parser().parse_args(flags)
    assert args.func(args) == 0
    (cfg,) = got
    assert (cfg.align_weight, cfg.align_layers, cfg.align_heads) == (0.5, (2, -1), 3)
    assert T.TrainConfig().align_weight == 0.0  # off unless asked for


def test_an_align_layer_past_the_model_exits_2_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawcast.transports.cli import main

    monkeypatch.setattr(D, "generate", lambda *a, **k: [])
    monkeypatch.setattr(D, "content_hash", lambda paths: "0" * 16)
    assert main(["train", "--align-weight", "1", "--align-layers", "4", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rawcast train: --align-layers 4 is not a layer of a 4-layer model"]


@pytest.mark.parametrize("value", ["x", "1,,2", ""])
def test_bad_align_layers_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from rawcast.transports.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--align-layers", value])
    assert e.value.code == 2
    assert "expected layer indices" in capsys.readouterr().err


def test_shipped_tokenizer_is_the_one_windows_are_made_with(tok: Tokenizer) -> None:
    """The word map relies on ByteLevel pre-tokenization: words never merge across a space."""
    cfg = json.loads(
        (Path(T.__file__).parents[1] / "weights" / "rawcast-tiny" / "tokenizer.json").read_text()
    )
    assert cfg["pre_tokenizer"]["type"] == "ByteLevel"
    for text in (TEXT, "i like the yellow door", "don't stop, he said."):
        assert A.token_words(tok.encode, text.split())
