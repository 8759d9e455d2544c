"""``rawcast export-onnx MODEL OUT_DIR``: the engine's step as an ONNX graph.

Writes ``OUT_DIR/step.onnx`` (embedders and backbone; the KV cache as inputs and
outputs; dynamic batch, token and cache lengths; see ``rawcast.model.onnx_step``) and
``OUT_DIR/step.json`` (the model's fingerprint and the graph's inputs and outputs).
Run it with ``rawcast serve --backend onnx --onnx-dir OUT_DIR`` (``transcribe`` and
``narrate`` take the same options).
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export-onnx", help="export the step to ONNX for --backend onnx")
    p.add_argument("model", help="checkpoint directory or bundled model name")
    p.add_argument("out_dir", help="directory for step.onnx and step.json")
    p.set_defaults(func=_main, default_log_level="warning")


def _main(args: argparse.Namespace) -> int:
    import torch

    from rawcast.model.loader import CheckpointError, load
    from rawcast.model.onnx_step import OnnxExportError, export

    try:
        model = load(args.model, dtype=torch.float32)
    except CheckpointError as e:
        print(f"rawcast export-onnx: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        path = export(model, args.out_dir)
    except (OnnxExportError, OSError) as e:
        print(f"rawcast export-onnx: {e}", file=sys.stderr)
        return 1
    mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({mb:.1f} MiB) in {time.perf_counter() - t0:.0f} s")
    return 0
