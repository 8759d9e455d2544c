"""The engine's step on ONNX Runtime: export, and a backend with the torch model's API.

The exported graph is the pure tensor part of one ragged step (``Gemma4Unified``'s
``embed_ids`` -> ``run_layers`` -> final norm -> head at each row's last token). The KV
cache travels through it as inputs and outputs, the usual ONNX decoder pattern:

- inputs: ``input_ids``, ``positions`` (B, T); ``last`` (B,); ``audio`` (Na, 640);
  ``cells`` (Nc, 6912) and ``cell_positions`` (Nc, 2); ``mask_sliding`` and
  ``mask_full`` (B, 1, T, K + T) bool; and per layer ``past_k_<i>`` / ``past_v_<i>``
  (B, Hkv, K, D), the cached entries the rows attend to;
- outputs: ``logits`` (B, V) fp32 and per layer ``present_k_<i>`` / ``present_v_<i>``
  (B, Hkv, T, D), the new tokens' K and V.

B, T, K (per layer kind), Na and Nc are dynamic. The host side (packing, masks, which
cache rows to read, where to write, rollback) stays in torch on ``KVCache``, shared with
the torch backend, so both backends keep identical cache state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rawcast.model.cache import KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified

GRAPH_FILE = "step.onnx"
META_FILE = "step.json"
OPSET = 18


class OnnxExportError(RuntimeError):
    """The model could not be exported (or a graph does not fit the model)."""


class StepGraph(nn.Module):
    """``Gemma4Unified``'s step as a function of tensors only (what gets exported)."""

    def __init__(self, model: Gemma4Unified) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last: torch.Tensor,
        audio: torch.Tensor,
        cells: torch.Tensor,
        cell_positions: torch.Tensor,
        mask_sliding: torch.Tensor,
        mask_full: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        x = m.embed_ids(input_ids, audio, cells, cell_positions)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        x, new = m.run_layers(x, positions, {True: mask_sliding, False: mask_full}, pairs)
        x = x.gather(1, last.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)
        logits = m.head(m.norm(x))
        return (logits, *[t for kv in new for t in kv])


def input_names(n_layers: int) -> list[str]:
    fixed = ["input_ids", "positions", "last", "audio", "cells", "cell_positions"]
    fixed += ["mask_sliding", "mask_full"]
    return fixed + [f"past_{kv}_{i}" for i in range(n_layers) for kv in "kv"]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present_{kv}_{i}" for i in range(n_layers) for kv in "kv"]


def _example(model: Gemma4Unified) -> tuple[Any, ...]:
    """Small example inputs with every dynamic size distinct and >= 2."""
    cfg, tk = model.cfg, model.cfg.tokens
    b, t, ks, kf = 2, 5, 7, 9
    ids = torch.full((b, t), tk.pad, dtype=torch.long)
    ids[0, :3] = tk.audio
    ids[1, 1:5] = tk.image
    positions = torch.arange(t).repeat(b, 1) + 11
    last = torch.tensor([t - 1, t - 2])
    audio = torch.randn(3, cfg.audio.audio_embed_dim if cfg.audio else 640)
    cells = torch.rand(4, cfg.vision.cell_values if cfg.vision else 6912)
    cell_pos = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    ms = torch.ones(b, 1, t, ks + t, dtype=torch.bool)
    mf = torch.ones(b, 1, t, kf + t, dtype=torch.bool)
    past: list[torch.Tensor] = []
    text = cfg.text
    for i in range(text.num_hidden_layers):
        k = ks if text.is_sliding(i) else kf
        shape = (b, text.layer_kv_heads(i), k, text.layer_head_dim(i))
        past += [torch.randn(shape), torch.randn(shape)]
    return ids, positions, last, audio, cells, cell_pos, ms, mf, past


def _dynamic_shapes(model: Gemma4Unified) -> tuple[Any, ...]:
    d = torch.export.Dim.DYNAMIC
    past = [{0: d, 2: d} for _ in range(2 * model.cfg.text.num_hidden_layers)]
    return (
        {0: d, 1: d},
        {0: d, 1: d},
        {0: d},
        {0: d},
        {0: d},
        {0: d},
        {0: d, 2: d, 3: d},
        {0: d, 2: d, 3: d},
        past,
    )


def fingerprint(model: Gemma4Unified) -> str:
    """A hash of the model's config and weights: a graph belongs to exactly one model."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):  # raw bytes: no dtype copies
        h.update(f"{name}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def export(model: Gemma4Unified, out_dir: str | Path) -> Path:
    """Export ``model``'s step (fp32) to ``out_dir/step.onnx``; returns the graph path."""
    try:
        import onnx  # noqa: F401  # the exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OnnxExportError(f"exporting needs the onnx and onnxscript packages ({e})") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = model if model.dtype == torch.float32 else _fp32_copy(model)
    graph = StepGraph(m).eval()
    n = m.cfg.text.num_hidden_layers
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph,
            _example(m),
            dynamo=True,
            input_names=input_names(n),
            output_names=output_names(n),
            dynamic_shapes=_dynamic_shapes(m),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no program")
    path = out / GRAPH_FILE
    program.save(str(path), external_data=False)
    meta = {
        "fingerprint": fingerprint(m),
        "config": m.cfg.to_dict(),
        "inputs": input_names(n),
        "outputs": output_names(n),
        "opset": OPSET,
        "torch": torch.__version__,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own deprecation chatter is not the user's business."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _fp32_copy(model: Gemma4Unified) -> Gemma4Unified:
    m = Gemma4Unified(model.cfg)
    m.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    m.tokenizer = model.tokenizer
    return m.eval()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rawcast" / "onnx"


def ensure_exported(model: Gemma4Unified, where: str | Path | None = None) -> Path:
    """The graph for ``model``: ``where`` if given (exported there if missing), else a
    per-model directory in the user cache, exported on first use."""
    fp = fingerprint(model)
    out = Path(where) if where is not None else default_cache_dir() / fp
    meta = out / META_FILE
    if (out / GRAPH_FILE).exists() and meta.exists():
        got = json.loads(meta.read_text()).get("fingerprint")
        if got != fp:
            raise OnnxExportError(
                f"{out} holds a graph of another model (fingerprint {got}, this model {fp}); "
                "export this model to another directory"
            )
        return out / GRAPH_FILE
    return export(model, out)


class OnnxStep:
    """Runs ``step`` on onnxruntime with the same API (and cache) as the torch model.

    The torch model still packs rows, builds masks and owns the ``KVCache``; only the
    tensor work runs in the ONNX graph. fp32 only (as exported).
    """

    def __init__(
        self,
        model: Gemma4Unified,
        graph: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if model.dtype != torch.float32:
            raise OnnxExportError("the ONNX backend runs fp32 models (use --dtype float32)")
        self.model = model
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        avail = ort.get_available_providers()
        chosen = [p for p in (providers or _default_providers()) if p in avail]
        keep = torch.get_num_threads()
        self.session = ort.InferenceSession(
            str(graph), opts, providers=chosen or ["CPUExecutionProvider"]
        )
        torch.set_num_threads(keep)  # creating a session resets torch's thread count
        self.inputs = {i.name for i in self.session.get_inputs()}
        n = model.cfg.text.num_hidden_layers
        missing = {f"past_k_{i}" for i in range(n)} - self.inputs
        if missing or len(self.session.get_outputs()) != 1 + 2 * n:
            raise OnnxExportError(f"{graph} does not fit this model (layers: {n})")
        self.providers = self.session.get_providers()

    def step(self, rows: Sequence[Append], cache: KVCache) -> torch.Tensor:
        """Like ``Gemma4Unified.step``: logits (B, V) at each row's last token."""
        m = self.model
        p = m.pack(rows, cache)
        plan = m.plan(p, cache)
        past = m.gather_past(p, cache, plan)
        audio_dim = m.cfg.audio.audio_embed_dim if m.cfg.audio else 640
        cell_dim = m.cfg.vision.cell_values if m.cfg.vision else 6912
        feeds: dict[str, np.ndarray] = {
            "input_ids": _np(p.input_ids),
            "positions": _np(p.positions),
            "last": _np(p.last),
            "audio": _np(p.audio) if p.audio is not None else np.zeros((0, audio_dim), np.float32),
            "cells": _np(p.cells) if p.cells is not None else np.zeros((0, cell_dim), np.float32),
            "cell_positions": _np(p.cell_positions)
            if p.cell_positions is not None
            else np.zeros((0, 2), np.int64),
            "mask_sliding": _np(plan.masks[True]),
            "mask_full": _np(plan.masks[False]),
        }
        for i, (k, v) in enumerate(past):
            feeds[f"past_k_{i}"] = _np(k)
            feeds[f"past_v_{i}"] = _np(v)
        outs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})
        new = [
            (torch.from_numpy(outs[1 + 2 * i]), torch.from_numpy(outs[2 + 2 * i]))
            for i in range(len(past))
        ]
        m.write_kv(p, cache, plan, new)
        m.advance(p, cache)
        return torch.from_numpy(outs[0])


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu()
    if a.dtype.is_floating_point and a.dtype != torch.float32:
        a = a.float()
    return np.ascontiguousarray(a.numpy())


def _default_providers() -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]
