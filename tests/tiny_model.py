"""A random tiny Gemma 4 Unified model with a real BPE tokenizer, for engine tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rawcast.model.config import TokenIds, preset
from rawcast.model.gemma4 import Gemma4Unified
from rawcast.model.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
    "<|video|>", "<|audio>", "<audio|>", "<|audio|>",
]  # fmt: skip
TEXT = [
    "transcribe the audio",
    "translate the audio into spanish",
    "describe the image in one sentence",
    "user",
    "model",
    "the quick brown fox jumps over the lazy dog",
    "a red circle and a blue square",
    "hello world how are you today",
    "el zorro marron salta sobre el perro",
]


def tiny_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    return tok


def tiny_model(seed: int = 0) -> Gemma4Unified:
    """Random weights, tokenizer ids wired into the config."""
    hf_tok = tiny_tokenizer()
    ids = {s: hf_tok.token_to_id(s) for s in SPECIALS}
    tokens = TokenIds(
        pad=ids["<pad>"], eos=ids["<eos>"], bos=ids["<bos>"], boi=ids["<|image>"],
        eoi=ids["<image|>"], image=ids["<|image|>"], video=ids["<|video|>"], boa=ids["<|audio>"],
        eoa=ids["<audio|>"], audio=ids["<|audio|>"],
    )  # fmt: skip
    base = preset("tiny")
    text = dataclasses.replace(base.text, vocab_size=hf_tok.get_vocab_size(), sliding_window=32)
    cfg = dataclasses.replace(base, text=text, tokens=tokens)
    torch.manual_seed(seed)
    model = Gemma4Unified(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0, 0.1)
    model.tokenizer = Tokenizer(hf_tok, tokens)
    return model


def fixture_pcm(name: str = "fox-espeak-en-us.wav") -> npt.NDArray[np.float32]:
    """The fixture's 16 kHz mono samples as float32."""
    with av.open(str(FIXTURES / name)) as c:
        parts = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
    return (np.concatenate(parts).astype(np.float32) / 32768.0).astype(np.float32)
