"""The prompt format rawcast streams in, shared by the engine and the training recipe.

A session's prompt is ONE open user turn whose audio span grows as frames arrive:

    <bos><|turn>user\\n<|audio> a a a ... [<audio|><|image> cells <image|><|audio>] a a ...

A patch grid interrupts the audio span as its own block. To read text out, a
task opens a branch that closes the turn and asks its instruction:

    <audio|>\\n{instruction}<turn|>\\n<|turn>model\\n  -> greedy decode until <turn|>

and the cache is rolled back to the prefix afterwards, so the stream continues.
Instructions are plain text (Gemma 4 has no task tags).
"""

from __future__ import annotations

from dataclasses import dataclass

from rawcast.model.tokenizer import Tokenizer

TRANSCRIBE = "Transcribe the audio."
TRANSLATE = "Translate the audio into {language}."
CAPTION = "Describe the image in one sentence."


def instruction(task: str, language: str | None = None) -> str:
    if task == "transcribe":
        return TRANSCRIBE
    if task == "translate":
        if not language:
            raise ValueError("translation needs a target language")
        return TRANSLATE.format(language=language)
    if task == "caption":
        return CAPTION
    raise ValueError(f"unknown task {task!r}: transcribe, translate or caption")


@dataclass(frozen=True)
class PromptFormat:
    tok: Tokenizer

    def stream_prefix(self) -> list[int]:
        """Start of a session: an open user turn with an open audio span."""
        ids = self.tok.ids
        return [ids.bos, self.tok.turn_open, *self.tok.encode("user\n"), ids.boa]

    def image_block(self, n_cells: int, in_audio: bool = True) -> list[int]:
        """A patch grid's tokens; inside an audio span it closes and reopens the span."""
        ids = self.tok.ids
        block = [ids.boi, *([ids.image] * n_cells), ids.eoi]
        return [ids.eoa, *block, ids.boa] if in_audio else block

    def branch(self, task: str, language: str | None = None) -> list[int]:
        """Close the audio span and the user turn, ask the task, open the model turn."""
        ids = self.tok.ids
        return [
            ids.eoa,
            *self.tok.encode("\n" + instruction(task, language)),
            self.tok.turn_close,
            *self.tok.encode("\n"),
            self.tok.turn_open,
            *self.tok.encode("model\n"),
        ]

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.tok.turn_close, self.tok.ids.eos})
