"""Checkpoint averaging: a run's export as the mean of its weights at its last saves.

``rawcast train --average-last N`` keeps the model's weights at each of the run's last
``N`` scheduled saves (every ``export_every`` steps, the last step included) in
``RUN_DIR/tail/``, and the export at the run's last step is their uniform mean (the
checkpoint averaging of ESPnet's and fairseq's recipes: the mean of nearby points of one
run, whose noise averages out). The run's own state (``state.pt``) keeps the trained
weights, so a later phase with ``--init-from RUN_DIR`` starts from them, not from the
mean; ``--init-from`` the export starts from the mean. The snapshots are files, so a run
stopped and resumed inside the window still averages all of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class TailAverage:
    """The snapshots of one run's last ``n`` saves, and their mean."""

    def __init__(self, folder: Path, n: int, every: int, steps: int) -> None:
        self.folder = folder
        self.on = n > 1
        due = {*range(every, steps + 1, every), steps}  # the scheduled saves
        self.kept = sorted(due)[-n:] if self.on else []  # the last n: the steps averaged

    def _file(self, step: int) -> Path:
        return self.folder / f"{step:08d}.pt"

    def keep(self, step: int, model: nn.Module) -> None:
        """Snapshot the weights if ``step`` is one of the averaged saves."""
        if step not in self.kept:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "snapshot.tmp.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(self._file(step))

    def missing(self) -> list[int]:
        return [s for s in self.kept if not self._file(s).exists()]

    def averaged(self, model: M) -> M:
        """A copy of ``model`` holding the mean of the kept snapshots (floating tensors;
        the others, e.g. integer buffers, as in ``model``)."""
        files = [self._file(s) for s in self.kept if self._file(s).exists()]
        if not files:
            raise FileNotFoundError(f"no weights to average under {self.folder}")
        total: dict[str, torch.Tensor] = {}
        for f in files:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            for k, v in sd.items():
                if v.is_floating_point():
                    total[k] = total[k] + v.double() if k in total else v.double()
        out = copy.deepcopy(model)
        state = out.state_dict()
        for k, v in total.items():
            state[k].copy_((v / len(files)).to(state[k].dtype))
        return out
