"""The text tokenizer: ``tokenizer.json`` through the ``tokenizers`` library.

Special tokens follow Gemma 4 (section 1 of the spec). Their ids are read from
the tokenizer's own vocabulary when present, otherwise taken from the model
config, and the two must agree. ``<bos>`` is never added implicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from rawcast.model.config import TokenIds

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "boi": "<|image>",
    "eoi": "<image|>",
    "image": "<|image|>",
    "video": "<|video|>",
    "boa": "<|audio>",
    "eoa": "<audio|>",
    "audio": "<|audio|>",
}
TURN_OPEN = "<|turn>"
TURN_CLOSE = "<turn|>"


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, tok: HFTokenizer, ids: TokenIds) -> None:
        self._tok = tok
        self.ids = ids
        self.turn_open = self._require(TURN_OPEN)
        self.turn_close = self._require(TURN_CLOSE)
        self.special_ids = frozenset(
            [*(getattr(ids, f) for f in SPECIAL_TOKENS), self.turn_open, self.turn_close]
        )

    @staticmethod
    def from_file(path: str | Path, config_ids: TokenIds) -> Tokenizer:
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from None
        for field, text in SPECIAL_TOKENS.items():
            found = tok.token_to_id(text)
            want = getattr(config_ids, field)
            if found is not None and found != want:
                raise TokenizerError(f"{path}: {text} has id {found} but config.json says {want}")
        return Tokenizer(tok, config_ids)

    def _require(self, text: str) -> int:
        found = self._tok.token_to_id(text)
        if found is None:
            raise TokenizerError(f"tokenizer has no {text} token")
        return int(found)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def token_id(self, text: str) -> int:
        return self._require(text)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        keep = [i for i in ids if not (skip_special and i in self.special_ids)]
        return str(self._tok.decode(keep, skip_special_tokens=False))
