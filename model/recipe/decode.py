"""Greedy decoding for tests and evaluation, the way the streaming engine does it.

The prompt prefix and the media are appended to a ``KVCache`` with ``model.step``,
then the task's branch, then one token per step until ``<turn|>`` (or ``<eos>``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.loops import LOOP_RULE, LoopRule, loop_cut
from rawcast.model.prompt import PromptFormat

FRAME = 640


def prompt_ids(
    fmt: PromptFormat,
    n_frames: int,
    task: str,
    n_cells: int = 0,
    language: str | None = None,
    image_after: int = 0,
) -> tuple[list[int], list[int]]:
    """(media part, branch part) of the prompt: prefix + audio, with an image block after
    the first ``image_after`` audio frames when ``n_cells`` (a video frame that arrives
    mid-utterance, as the engine appends it), then the branch."""
    ids = fmt.tok.ids
    head = fmt.stream_prefix()
    k = min(max(0, image_after), n_frames)
    head += [ids.audio] * k
    if n_cells:
        head += fmt.image_block(n_cells)
    head += [ids.audio] * (n_frames - k)
    if task == "translate" and language is None:
        language = "Spanish"
    return head, fmt.branch(task, language)


def greedy(
    model: Gemma4Unified,
    task: str,
    audio: npt.NDArray[np.float32] | None = None,
    image: tuple[torch.Tensor, torch.Tensor] | None = None,
    language: str | None = None,
    max_new: int = 48,
    loop_rule: LoopRule | None = LOOP_RULE,
    image_after: int = 0,
) -> list[int]:
    """Greedy token ids of the answer (without the stop token). With ``loop_rule`` (the
    engine's default) a decode ending in a repeated block stops there, as the engine's
    does; None decodes on until the stop token or ``max_new``."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer")
    fmt = PromptFormat(model.tokenizer)
    fr = None
    if audio is not None and audio.size:
        pad = (-audio.size) % FRAME
        fr = torch.from_numpy(np.pad(audio, (0, pad)).reshape(-1, FRAME).astype(np.float32))
    n_frames = 0 if fr is None else int(fr.shape[0])
    n_cells = 0 if image is None else int(image[0].shape[0])
    head, branch = prompt_ids(fmt, n_frames, task, n_cells, language, image_after)
    spec = CacheSpec(
        slots=1,
        full_capacity=len(head) + len(branch) + max_new + 8,
        branch_room=len(branch) + max_new + 8,
    )
    cache = KVCache(model.cfg.text, spec, device=model.device, dtype=model.dtype)
    images = [image] if image is not None else []
    model.step([Append(slot=0, tokens=head, audio=fr, images=images)], cache)
    logits = model.step([Append(slot=0, tokens=branch)], cache)
    out: list[int] = []
    stop = fmt.stop_ids
    for _ in range(max_new):
        nxt = int(logits[0].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        cut = None if loop_rule is None else loop_cut(out, loop_rule)
        if cut is not None:
            return out[:cut]
        logits = model.step([Append(slot=0, tokens=[nxt])], cache)
    return out


def transcribe(
    model: Gemma4Unified,
    audio: npt.NDArray[np.float32],
    task: str = "transcribe",
    picture: npt.NDArray[np.uint8] | None = None,
) -> str:
    """The greedy transcript (or translation) of ``audio``; with ``picture``, a camera
    frame in the segment halfway through the audio (a call with video)."""
    assert model.tokenizer is not None
    cells = None if picture is None else _cells(model, picture)
    half = (audio.size + FRAME - 1) // FRAME // 2
    ids = greedy(model, task, audio=audio, image=cells, image_after=half)
    return model.tokenizer.decode(ids).strip()


def _cells(model: Gemma4Unified, image: npt.NDArray[np.uint8]) -> tuple[torch.Tensor, torch.Tensor]:
    from rawcast.pipeline.vision import patch_image

    grid = patch_image(image, max_soft_tokens=model.image_budget)
    return torch.from_numpy(grid.cells), torch.from_numpy(grid.positions)


def caption(model: Gemma4Unified, image: npt.NDArray[np.uint8]) -> str:
    assert model.tokenizer is not None
    return model.tokenizer.decode(greedy(model, "caption", image=_cells(model, image))).strip()
