"""Step throughput: rawcast's ragged step versus transformers' forward with its cache.

Both run the SAME weights in the same process (rawcast shares the transformers
model's tensors), so the ratios compare implementations, not machines.
Reports tokens/s for decode at batch 1, 8, 32 and for media appends of 8 and 64
audio frames at batch 1, plus the KV-cache memory of one slot.

    python bench/step.py                       # tiny preset, fp32 and bf16
    python bench/step.py --config 12b-shaped-L6 --dtype bf16 --batches 1 8
    python bench/step.py --compile             # also rawcast with torch.compile

``--compile`` applies ``torch.compile`` from outside the model code to
``Gemma4Unified.cached_step`` (the whole device part of the step: embedding, masks,
cache reads, layers and cache writes; packing and lengths stay on the host) with
static steps (``Gemma4Unified.static_steps``: audio and branch rows always present),
exactly as ``--compile`` runs it, and adds a column for it; the warm-up absorbs
compilation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from machine import describe

from rawcast.model import Append, CacheSpec, KVCache, preset
from rawcast.model.cache import slot_bytes
from rawcast.model.loader import from_state_dict
from rawcast.transports.runtime import compiled

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = 64


def hf_model(name: str, dtype: torch.dtype) -> Any:
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    cfg = preset(name)
    d = cfg.to_dict()
    hf_cfg = Gemma4UnifiedConfig(**{k: v for k, v in d.items() if k != "model_type"})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Gemma4UnifiedForConditionalGeneration(hf_cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name_, p in model.named_parameters():
            if "norm" in name_ or "_ln" in name_:
                p.fill_(1.0)
        for layer in model.model.language_model.layers:
            layer.layer_scalar.fill_(1.0)
    return model.eval()


COMPILED: dict[str, Any] = {"on": False}


def _row(work: str, rawcast_s: float, hf_s: float, tokens: int, comp_s: float | None = None) -> str:
    row = f"| {work} | {tokens / rawcast_s:.1f} | {tokens / hf_s:.1f} | {hf_s / rawcast_s:.2f}x |"
    if comp_s is not None:
        row += f" {tokens / comp_s:.1f} | {hf_s / comp_s:.2f}x |"
    return row


def interleaved(
    model: Any, ours: Callable[[], Any], theirs: Callable[[], Any], reps: int
) -> tuple[float, float, float | None]:
    """Median seconds per call of rawcast eager, transformers and (``--compile``) rawcast
    compiled, measured round-robin (one call of each per round) so that a machine whose
    load drifts during the run slows all three alike."""
    plain = model.cached_step
    compiled = COMPILED.get("fn") if COMPILED["on"] else None

    def comp() -> None:  # exactly what --compile runs: the compiled step, static steps
        model.cached_step, model.static_steps = compiled, True
        try:
            ours()
        finally:
            model.cached_step, model.static_steps = plain, False

    fns: list[Callable[[], Any]] = [ours, theirs] + ([comp] if compiled else [])
    for fn in fns:
        fn()  # warm-up (and compilation, not timed)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    med = [statistics.median(t) for t in times]
    return med[0], med[1], (med[2] if compiled else None)


def bench_decode(
    model: Any,
    hf: Any,
    spec: CacheSpec,
    dtype: torch.dtype,
    b: int,
    prompt_ids: torch.Tensor,
    reps: int,
) -> str:
    from transformers import DynamicCache

    cache = KVCache(model.cfg.text, spec, dtype=dtype)
    with torch.inference_mode():
        model.step([Append(s, prompt_ids) for s in range(b)], cache)
    marks = [cache.mark(s) for s in range(b)]
    rows = [Append(s, [7]) for s in range(b)]

    def ours() -> None:
        for s in range(b):
            if cache.length(s) - marks[s] >= spec.branch_room:
                cache.rollback(s, marks[s])
        model.step(rows, cache)

    hf_cache = DynamicCache(config=hf.config.get_text_config())
    with torch.inference_mode():
        hf(input_ids=prompt_ids.expand(b, -1), cache=hf_cache, use_cache=True)
    step_ids = torch.full((b, 1), 7)

    def theirs() -> None:
        with torch.inference_mode():
            hf(input_ids=step_ids, cache=hf_cache, use_cache=True)

    mine, hf_s, comp = interleaved(model, ours, theirs, reps)
    return _row(f"decode batch {b}", mine, hf_s, b, comp)


def bench_append(
    model: Any,
    hf: Any,
    spec: CacheSpec,
    dtype: torch.dtype,
    n: int,
    prompt_ids: torch.Tensor,
    reps: int,
) -> str:
    from transformers import DynamicCache

    cache = KVCache(model.cfg.text, spec, dtype=dtype)
    with torch.inference_mode():
        model.step([Append(0, prompt_ids)], cache)
    frames = 0.1 * torch.randn(n, 640, generator=torch.Generator().manual_seed(n))
    ids = [model.cfg.tokens.audio] * n

    def ours() -> None:
        model.step([Append(0, ids, audio=frames)], cache)

    hf_cache = DynamicCache(config=hf.config.get_text_config())
    with torch.inference_mode():
        hf(input_ids=prompt_ids.view(1, -1), cache=hf_cache, use_cache=True)
    hf_ids = torch.tensor([ids])
    mask = torch.ones(1, n, dtype=torch.bool)
    feats = frames.view(1, n, 640).to(dtype)

    def theirs() -> None:
        with torch.inference_mode():
            hf(
                input_ids=hf_ids,
                input_features=feats,
                input_features_mask=mask,
                cache=hf_cache,
                use_cache=True,
            )

    mine, hf_s, comp = interleaved(model, ours, theirs, reps)
    return _row(f"append {n} audio frames", mine, hf_s, n, comp)


def bench_config(
    name: str, dtype_name: str, batches: list[int], appends: list[int], reps: int
) -> None:
    dtype = DTYPES[dtype_name]
    hf = hf_model(name, dtype)
    cfg = preset(name)
    model = from_state_dict(cfg, hf.state_dict(), dtype=dtype)
    if COMPILED["on"]:
        COMPILED["fn"] = compiled(model.cached_step)
    # both caches grow by n per timed call (warm-ups, eager and compiled runs)
    full = PROMPT + max(appends, default=0) * (2 * reps + 4) + 64
    spec = CacheSpec(slots=max(batches), full_capacity=full, branch_room=256)
    mib = slot_bytes(cfg.text, spec, dtype) / 2**20
    print(
        f"\n## {name} {dtype_name}: one slot's KV cache = {mib:.2f} MiB (window "
        f"{cfg.text.sliding_window} + branch {spec.branch_room}, full {spec.full_capacity})"
    )
    if COMPILED["on"]:
        print("| work | rawcast tok/s | transformers tok/s | ratio | compiled tok/s | ratio |")
        print("|---|---|---|---|---|---|")
    else:
        print("| work | rawcast tok/s | transformers tok/s | ratio |")
        print("|---|---|---|---|")
    prompt_ids = torch.randint(3, 200, (PROMPT,), generator=torch.Generator().manual_seed(0))
    for b in batches:
        print(bench_decode(model, hf, spec, dtype, b, prompt_ids, reps), flush=True)
    for n in appends:
        print(bench_append(model, hf, spec, dtype, n, prompt_ids, reps), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", nargs="+", default=["tiny"])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--appends", nargs="*", type=int, default=[8, 64], help="none: skip")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--compile", action="store_true", help="also time the compiled step as --compile runs it"
    )
    args = ap.parse_args()
    COMPILED["on"] = args.compile
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights drive activations into denormals on CPU
    print(
        f"# bench/step.py on {describe()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name in args.config:
        for dt in args.dtype:
            bench_config(name, dt, args.batches, args.appends, args.reps)


if __name__ == "__main__":
    main()
