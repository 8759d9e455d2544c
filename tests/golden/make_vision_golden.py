"""Regenerate the vision goldens in tests/golden/vision/ from transformers' own processor.

The reference is ``transformers.Gemma4UnifiedImageProcessor`` (transformers 5.24.0), the
only image processor transformers ships for gemma4_unified. It is a torchvision backend:
``image_processing_gemma4_unified`` imports ``torchvision.transforms.v2.functional`` at
module level, and there is no PIL variant. PyPI's torchvision is a CUDA build whose C
extension does not load beside the CPU torch of rawcast's venv, so this script runs
with torchvision's pure-Python part only, unpacked outside the repo and the venv::

    .venv/bin/python -m pip install --no-deps --target /tmp/tvonly torchvision==0.28.0
    PYTHONPATH=/tmp/tvonly .venv/bin/python tests/golden/make_vision_golden.py

(torchvision 0.28 is the release paired with torch 2.13.) The C extension only provides
detection ops (nms, roi_align, ...); torchvision's import registers fake kernels for
``torchvision::nms``/``qnms`` and fails when those operators were never defined, so the
script declares the two schemas first. Nothing else is stubbed: the resize that runs is
torchvision's ``resize_image``, which on CPU hands uint8 straight to torch's native
antialiased bicubic kernel.

Inputs are not stored: ``make_image`` rebuilds them from the recipe in manifest.json
(the test imports this module for it and checks each input's sha256). Outputs are the
real (non-padding) cells as uint8 (the reference's float cells are exactly
``u8 * float32(1/255)``, checked here, so this is lossless), laid back out as the
resized image and stored as ``<case>.png`` (PNG packs that image far tighter than
the raw cells; ``image_to_cells`` is the way back, checked here), and the real
cells' (x, y) positions in ``positions.npz``; manifest.json gives rows, cols and
the padding count. The padding rows
are checked here (zero cells, position (-1, -1)) and their count is recorded.

Functions other than ``main`` import only numpy, so the test can load this file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

OUT_DIR = Path(__file__).resolve().parent / "vision"
CELL = 48

# (width, height, kind, max_soft_tokens); a case's seed is its index here. Upscaled noise
# does not compress, so only the small-budget cases use it.
CASES: list[tuple[int, int, str, int]] = [
    (1, 1, "noise", 280),
    (1, 1, "noise", 70),
    (4000, 30, "structured", 280),
    (4000, 30, "structured", 70),
    (30, 4000, "structured", 280),
    (30, 4000, "structured", 70),
    (640, 480, "structured", 280),
    (640, 480, "structured", 70),
    (1920, 1080, "structured", 280),
    (1920, 1080, "structured", 70),
    (48, 48, "structured", 280),
    (48, 48, "noise", 70),
    (100, 37, "structured", 280),
    (100, 37, "structured", 70),
    (384, 384, "structured", 70),  # already the target size: no resize at all
    (4000, 1, "noise", 70),  # a side rounds to 0: the max-side rule
    (1, 4000, "noise", 70),
]


def case_name(width: int, height: int, budget: int) -> str:
    return f"w{width}_h{height}_t{budget}"


def make_image(width: int, height: int, kind: str, seed: int) -> npt.NDArray[np.uint8]:
    """A deterministic RGB uint8 image of shape (height, width, 3).

    ``noise``: uniform seeded noise. ``structured``: horizontal and vertical ramps,
    hard-edged diagonal stripes, a flat rectangle and a block of seeded noise.
    """
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if kind != "structured":
        raise ValueError(f"unknown kind {kind!r}")
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    r = x * 255 // max(width - 1, 1)
    g = y * 255 // max(height - 1, 1)
    period = max(2, min(width, height) // 6)
    b = ((x + y) // period % 2) * 255
    img = np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)
    img[height // 4 : height // 2, width // 3 : width // 2] = (250, 10, 120)
    nh, nw = max(1, height // 5), max(1, width // 5)
    img[height - nh :, width - nw :] = rng.integers(0, 256, size=(nh, nw, 3), dtype=np.uint8)
    return img


def image_to_cells(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """(rows*48, cols*48, 3) -> (rows*cols, 6912): 48x48x3 cells, raster order."""
    h, w, _ = image.shape
    rows, cols = h // CELL, w // CELL
    cells = image.reshape(rows, CELL, cols, CELL, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(cells.reshape(rows * cols, CELL * CELL * 3))


def cells_to_image(cells: npt.NDArray[np.uint8], rows: int, cols: int) -> npt.NDArray[np.uint8]:
    """The inverse of ``image_to_cells``."""
    image = cells.reshape(rows, cols, CELL, CELL, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(image.reshape(rows * CELL, cols * CELL, 3))


def sha256(arr: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def cases() -> list[dict[str, Any]]:
    """The case list as dicts (name, width, height, kind, seed, max_soft_tokens)."""
    return [
        {
            "name": case_name(width, height, budget),
            "width": width,
            "height": height,
            "kind": kind,
            "seed": seed,
            "max_soft_tokens": budget,
        }
        for seed, (width, height, kind, budget) in enumerate(CASES)
    ]


def _declare_torchvision_ops() -> None:
    """Let torchvision import without its C extension (see the module docstring)."""
    import torch

    for name in ("nms", "qnms"):
        try:
            torch.library.define(
                f"torchvision::{name}",
                "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            )
        except RuntimeError:  # already defined: the real extension loaded
            pass


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")  # missing _C extension
    _declare_torchvision_ops()
    import torch
    import transformers
    from PIL import Image
    from transformers import Gemma4UnifiedImageProcessor

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in [*OUT_DIR.glob("*.png"), *OUT_DIR.glob("*.npz")]:
        old.unlink()
    scale = np.float32(1 / 255)
    manifest: dict[str, Any] = {
        "reference": "transformers.Gemma4UnifiedImageProcessor",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cases": [],
    }
    positions: dict[str, npt.NDArray[np.int64]] = {}
    for case in cases():
        img = make_image(case["width"], case["height"], case["kind"], case["seed"])
        budget = case["max_soft_tokens"]
        proc = Gemma4UnifiedImageProcessor(max_soft_tokens=budget)
        out = proc(images=[img], input_data_format="channels_last", return_tensors="pt")
        pv = out["pixel_values"][0].numpy()
        pos = out["image_position_ids"][0].numpy()
        n = int(out["num_soft_tokens_per_image"][0])
        assert pv.dtype == np.float32 and pv.shape == (budget, CELL * CELL * 3), pv.shape
        assert pos.dtype == np.int64 and pos.shape == (budget, 2), pos.shape
        # Padding: zero cells at position (-1, -1) after the n real cells.
        assert not pv[n:].any() and (pos[n:] == -1).all()
        real, real_pos = pv[:n], pos[:n]
        u8 = np.rint(real * 255).astype(np.uint8)
        assert np.array_equal(u8.astype(np.float32) * scale, real), "cells are not k/255"
        cols = int(real_pos[:, 0].max()) + 1
        rows = int(real_pos[:, 1].max()) + 1
        assert rows * cols == n
        # The cells are a permutation of the resized image's pixels, and PNG compresses
        # that image far better than the cells: store it, and check the way back.
        png = OUT_DIR / f"{case['name']}.png"
        Image.fromarray(cells_to_image(u8, rows, cols)).save(png, optimize=True)
        with Image.open(png) as back:
            assert np.array_equal(image_to_cells(np.asarray(back.convert("RGB"))), u8)
        positions[case["name"]] = real_pos.astype(np.int64)
        manifest["cases"].append(
            case
            | {
                "input_sha256": sha256(img),
                "rows": rows,
                "cols": cols,
                "num_cells": n,
                "padding_rows": budget - n,
            }
        )
        print(f"{case['name']}: {rows}x{cols} cells, {budget - n} padding", file=sys.stderr)
    # numpy types **kwds loosely (as allow_pickle: bool); the arrays are what it takes.
    np.savez_compressed(OUT_DIR / "positions.npz", **positions)  # type: ignore[arg-type]
    (OUT_DIR / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
