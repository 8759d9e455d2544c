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
    fmt: PromptFormat, n_frames: int, task: str, n_cells: int = 0, language: str | None = None
) -> tuple[list[int], list[int]]:
    """(media part, branch part) of the prompt: prefix [+ image block] + audio, then branch."""
    ids = fmt.tok.ids
    head = fmt.stream_prefix()
    if n_cells:
        head += fmt.image_block(n_cells)
    head += [ids.audio] * n_frames
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
    head, branch = prompt_ids(fmt, n_frames, task, n_cells, language)
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
    model: Gemma4Unified, audio: npt.NDArray[np.float32], task: str = "transcribe"
) -> str:
    assert model.tokenizer is not None
    return model.tokenizer.decode(greedy(model, task, audio=audio)).strip()


def caption(model: Gemma4Unified, image: npt.NDArray[np.uint8]) -> str:
    from rawcast.pipeline.vision import patch_image

    assert model.tokenizer is not None
    grid = patch_image(image, max_soft_tokens=model.image_budget)
    cells = (torch.from_numpy(grid.cells), torch.from_numpy(grid.positions))
    return model.tokenizer.decode(greedy(model, "caption", image=cells)).strip()
