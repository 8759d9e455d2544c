"""Model, step backend and VAD for a command: the options `serve`, `transcribe` and
`narrate` share, and one function that loads what they name.

``--backend onnx`` runs the engine's step on onnxruntime: the graph comes from
``--onnx-dir`` (exported there on first use) or from a per-model directory in the user
cache (``$XDG_CACHE_HOME/rawcast/onnx``), exported on first use.

``--drafter PATH`` adds a Gemma 4 MTP drafter: the engine's branches decode with
speculative greedy decoding (same text, fewer ticks when drafts are accepted; torch
backend only).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when a model does (keeps `rawcast --help` fast)
    from rawcast.model.drafter import Drafter
    from rawcast.model.gemma4 import Gemma4Unified
    from rawcast.pipeline.engine import StepBackend
    from rawcast.pipeline.vad import SileroModel

DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("torch", "onnx")


class RuntimeLoadError(Exception):
    """A model, graph or backend that cannot be loaded (one line for the user)."""


@dataclass(frozen=True)
class RuntimeOptions:
    model: str = "rawcast-tiny"
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "torch"
    onnx_dir: str | None = None
    threads: int = 0
    drafter: str | None = None  # MTP drafter checkpoint: speculative decoding
    compile: bool = False  # torch.compile the decoder stack (torch backend)


def add_model_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--model", default=env("RAWCAST_MODEL", "rawcast-tiny"),
        help="checkpoint directory or bundled model name (default: rawcast-tiny)",
    )  # fmt: skip
    p.add_argument("--device", default=env("RAWCAST_DEVICE", "cpu"))
    p.add_argument("--dtype", default=env("RAWCAST_DTYPE", "fp32"), choices=list(DTYPES))
    p.add_argument(
        "--backend", default=env("RAWCAST_BACKEND", "torch"), choices=BACKENDS,
        help="run the step on torch or onnxruntime (fp32; CUDA provider if installed)",
    )  # fmt: skip
    p.add_argument(
        "--onnx-dir", default=env("RAWCAST_ONNX_DIR"),
        help="exported graph for --backend onnx (default: exported to the user cache)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=env("RAWCAST_THREADS", "0"),
        help="torch/onnxruntime CPU threads (0: default)",
    )  # fmt: skip
    p.add_argument(
        "--drafter", default=env("RAWCAST_DRAFTER"), metavar="PATH",
        help="Gemma 4 MTP drafter checkpoint: speculative greedy decoding (torch backend)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true", default=env("RAWCAST_COMPILE", "") == "1",
        help="torch.compile the whole device step (faster steps; torch backend). Its graphs "
        "are built at start-up (serve, narrate), which takes minutes on a small CPU",
    )  # fmt: skip


def options(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(
        model=args.model, device=args.device, dtype=args.dtype, backend=args.backend,
        onnx_dir=args.onnx_dir, threads=args.threads, drafter=getattr(args, "drafter", None),
        compile=getattr(args, "compile", False),
    )  # fmt: skip


def load_model(opts: RuntimeOptions) -> tuple[Gemma4Unified, StepBackend]:
    """The model and what runs its step; ``RuntimeLoadError`` with one line on failure."""
    import torch

    from rawcast.model.loader import CheckpointError, load

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    if opts.backend == "onnx" and opts.dtype != "fp32":
        raise RuntimeLoadError("--backend onnx runs fp32 graphs: use --dtype fp32")
    _check_backend(opts)
    try:
        model = load(opts.model, device=opts.device, dtype=dtypes[opts.dtype])
    except CheckpointError as e:
        raise RuntimeLoadError(str(e)) from e
    if opts.backend == "torch":
        if opts.compile:
            compile_step(model)
        return model, model
    from rawcast.model.onnx_step import OnnxExportError, OnnxStep, ensure_exported

    try:
        graph = ensure_exported(model, opts.onnx_dir)
        return model, OnnxStep(model, graph, threads=opts.threads or None)
    except (OnnxExportError, OSError) as e:
        raise RuntimeLoadError(f"--backend onnx: {e}") from e


def compile_step(model: Gemma4Unified, backend: str = "inductor") -> None:
    """``torch.compile`` the whole device part of a cached step (``cached_step``: embed,
    masks, cache reads, layers, cache writes), from outside.

    Packing and the lengths stay on the host; shapes are dynamic so that the engine's
    many (batch, length, cached entries) combinations share a few graphs."""
    model.static_steps = True  # audio and branch rows always present: six graphs in all
    model.cached_step = compiled(model.cached_step, backend)  # type: ignore[method-assign]


def compiled(fn: Any, backend: str = "inductor") -> Any:
    """``torch.compile`` with dynamic shapes and inductor's C++ wrapper: the graph's kernels
    are launched from generated C++, not Python (``bench/step.py --compile``; figures in
    the README). With static steps (``compile_step``) the engine needs six graphs; the
    recompile limit leaves room for a caller without them instead of falling back to
    eager after 8. ``backend="eager"`` traces and guards exactly the same graphs without
    generating code (tests count graphs with it)."""
    import torch
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor
    import torch.fx.experimental._config as shapes

    inductor.cpp_wrapper = True
    # no shared symbol for sizes that happen to be equal (two audio frames and two image
    # cells in one step are not the same size: a step with eleven frames would recompile)
    shapes.use_duck_shape = False
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    # the weights never change under a running model: no per-call guards on its modules
    skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(fn, backend=backend, dynamic=True, options={"guard_filter_fn": skip})


def _check_backend(opts: RuntimeOptions) -> None:
    if opts.compile and opts.backend != "torch":
        raise RuntimeLoadError("--compile applies to --backend torch only")
    if opts.drafter and opts.backend != "torch":
        raise RuntimeLoadError(
            f"--drafter needs --backend torch (speculative decoding verifies drafts with the "
            f"torch model's hidden states; --backend {opts.backend} has none)"
        )


def check_drafter(opts: RuntimeOptions) -> None:
    """Check from the two configs alone (no weights) that ``--drafter`` fits ``--model``."""
    if not opts.drafter:
        return
    _check_backend(opts)
    from rawcast.model import drafter, loader
    from rawcast.model.config import ConfigError

    try:
        cfg = drafter.load_config(loader.resolve(opts.drafter))
        cfg.check_target(loader.load_config(loader.resolve(opts.model)).text)
    except loader.CheckpointError as e:
        raise RuntimeLoadError(f"--drafter: {e}") from e
    except ConfigError as e:
        raise RuntimeLoadError(f"--drafter {opts.drafter} does not fit the model: {e}") from e


def load_drafter(opts: RuntimeOptions, model: Gemma4Unified) -> Drafter | None:
    """The ``--drafter`` checkpoint, checked against ``model`` (None without one)."""
    if not opts.drafter:
        return None
    _check_backend(opts)
    from rawcast.model.drafter import load
    from rawcast.model.loader import CheckpointError

    try:
        return load(opts.drafter, device=model.device, dtype=model.dtype, target=model)
    except CheckpointError as e:
        raise RuntimeLoadError(f"--drafter: {e}") from e


def load_vad(enabled: bool = True) -> SileroModel | None:
    from rawcast.pipeline.vad import SileroModel

    return SileroModel() if enabled else None
