"""Speculative decoding with the MTP drafter versus plain greedy decoding, same run.

For each batch size: B streams get a prompt (context + closing tokens), then decode
N tokens; plain greedy (one ``model.step`` per token) and speculative (drafter
proposes k, ONE target forward verifies, see ``rawcast.model.speculative``) run on
the same weights and prompts and must emit the same tokens (checked). Reports decode
tokens/s, the acceptance rate, target forwards, and at batch 1 the final-text latency
(closing tokens appended -> last token decoded), a model-level proxy for the
engine's end-of-speech-to-final-text time.

Then the engine (``EngineCore`` with and without ``drafter=``, same run): S sessions
(transcription + translation, no VAD) get the fixture speech and decode its partial
texts; then ``commit()`` ends their speech and the time until each session's last
final text event is measured (the end-of-speech-to-final-text latency users see),
with the ticks that took and the acceptance rate; final texts are checked equal.
The engine needs a tokenizer: it runs ``--model`` or the bundled ``rawcast-tiny``.

Without ``--drafter`` the drafter is random (acceptance near 1/vocab: the figures
then show the overhead, not a speed-up); ``--model``/``--drafter`` take checkpoints,
e.g. the bundled pair. With a tokenizer the prompts are real: the fixture speech (cut
shorter per row) and the transcribe prompt, decoded to the end of the turn.

    python bench/speculative.py
    python bench/speculative.py --model rawcast-tiny --drafter rawcast-tiny-drafter --k 2
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import torch

from rawcast.model import CacheSpec, KVCache, loader, preset
from rawcast.model.config import FULL, SLIDING
from rawcast.model.drafter import Drafter, DrafterConfig
from rawcast.model.drafter import load as load_drafter
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.prompt import PromptFormat
from rawcast.model.speculative import SpecConfig, generate, greedy
from rawcast.pipeline.engine import EngineConfig, EngineCore
from rawcast.pipeline.logs import configure_logging
from rawcast.pipeline.media import Event, TextEvent
from rawcast.pipeline.session import SessionConfig, Tasks

FRAME = 640
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fox-espeak-en-us.wav"


def random_target(seed: int = 0) -> Gemma4Unified:
    torch.manual_seed(seed)
    model = Gemma4Unified(preset("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0, 0.1)
    return model


def random_drafter(target: Gemma4Unified, seed: int = 1) -> Drafter:
    """A 4-layer drafter (3 sliding, 1 full) of half the target's width, random weights."""
    t = target.cfg.text
    text = dataclasses.replace(
        t,
        hidden_size=t.hidden_size // 2,
        intermediate_size=t.intermediate_size // 2,
        num_hidden_layers=4,
        layer_types=(SLIDING, SLIDING, SLIDING, FULL),
    )
    cfg = DrafterConfig(text=text, backbone_hidden_size=t.hidden_size)
    cfg.check_target(t)
    torch.manual_seed(seed)
    d = Drafter(cfg).to(target.dtype).eval()
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0, 0.1)
    return d


def run(
    model: Gemma4Unified,
    drafter: Drafter,
    batch: int,
    new: int,
    spec: SpecConfig,
    context: int,
) -> dict[str, float]:
    t = model.cfg.text
    special = sorted(set(dataclasses.astuple(model.cfg.tokens)))
    suppress = torch.tensor(special)
    if model.tokenizer is not None:
        prompts, closing = speech_prompts(model, batch)
    else:
        g = torch.Generator().manual_seed(batch)
        text_ids = torch.tensor([i for i in range(3, min(t.vocab_size, 400)) if i not in special])
        n_ids = len(text_ids)
        prompts = [
            Append(i, text_ids[torch.randint(n_ids, (context,), generator=g)]) for i in range(batch)
        ]
        closing = [text_ids[torch.randint(n_ids, (4,), generator=g)] for _ in range(batch)]
    tok = model.tokenizer
    stop = (tok.ids.eos, tok.turn_close) if tok is not None else ()  # real text ends itself
    longest = max(len(p.tokens) for p in prompts)
    cs = CacheSpec(slots=batch, full_capacity=longest + new + 64, branch_room=new + spec.k_max + 8)
    out: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for name in ("plain", "spec"):
        cache = KVCache(t, cs, device=model.device, dtype=model.dtype)
        model.step(prompts, cache)
        rows = [Append(i, c) for i, c in enumerate(closing)]
        t0 = time.perf_counter()
        if name == "plain":
            tokens[name] = greedy(model, cache, rows, new, stop, suppress)
            forwards = max(map(len, tokens[name]))
        else:
            res = generate(model, drafter, cache, rows, new, spec, stop, suppress)
            tokens[name], forwards = res.tokens, res.forwards + 1
            out["acceptance"] = res.acceptance
        dt = time.perf_counter() - t0
        out[f"{name}_tok_s"] = sum(map(len, tokens[name])) / dt
        out[f"{name}_latency_ms"] = dt * 1e3
        out[f"{name}_forwards"] = forwards
    if tokens["plain"] != tokens["spec"]:
        raise AssertionError("speculative decoding emitted different tokens than greedy")
    return out


def speech_prompts(model: Gemma4Unified, batch: int) -> tuple[list[Append], list[torch.Tensor]]:
    """Real transcription prompts: the fixture speech (cut shorter for each next row)
    appended as audio, then the closing transcribe prompt, as the engine decodes."""
    assert model.tokenizer is not None
    fmt = PromptFormat(model.tokenizer)
    pcm = speech()
    prompts, closing = [], []
    for i in range(batch):
        cut = pcm[: max(FRAME, pcm.size - (i % 8) * 4000)]
        frames = torch.from_numpy(np.pad(cut, (0, -cut.size % FRAME)).reshape(-1, FRAME))
        ids = [*fmt.stream_prefix(), *[model.cfg.tokens.audio] * frames.shape[0]]
        prompts.append(Append(i, ids, audio=frames))
        closing.append(torch.tensor(fmt.branch("transcribe", None)))
    return prompts, closing


def step_costs(model: Gemma4Unified, drafter: Drafter, reps: int = 50) -> dict[str, float]:
    """Batch 1, after a prompt: ms of one target step (one token) and of drafting k=1 and
    k=4 tokens (median; the cache is rolled back after every target step)."""
    if model.tokenizer is not None:
        prompts, _ = speech_prompts(model, 1)
    else:
        prompts = [Append(0, torch.arange(3, 200) % 250 + 3)]
    cache = KVCache(model.cfg.text, CacheSpec(slots=1, full_capacity=1024, branch_room=64))
    hidden = model.step_hidden(prompts, cache)[:, len(prompts[0].tokens) - 1]
    tok = [Append(0, [int(model.head(hidden).argmax(-1))])]
    mark = cache.mark(0)

    def target() -> None:
        model.step_hidden(tok, cache)
        cache.rollback(0, mark)

    def median_ms(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    return {
        "target": median_ms(target),
        "draft1": median_ms(lambda: drafter.propose(model, cache, tok, hidden, 1)),
        "draft4": median_ms(lambda: drafter.propose(model, cache, tok, hidden, 4)),
    }


def speech() -> npt.NDArray[np.float32]:
    """The test fixture (an espeak sentence), 16 kHz mono float32."""
    with av.open(str(FIXTURE)) as c:
        parts = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
    return (np.concatenate(parts).astype(np.float32) / 32768.0).astype(np.float32)


def engine_run(
    model: Gemma4Unified, drafter: Drafter | None, sessions: int, spec: SpecConfig
) -> dict[str, object]:
    """End of speech (``commit``) -> last final text event, per session (one segment each)."""
    core = EngineCore(model, EngineConfig(max_sessions=sessions), drafter=drafter, spec=spec)
    cfg = SessionConfig(tasks=Tasks(transcribe=True, translate="Spanish"), vad=None)
    finals: list[dict[int, tuple[float, str]]] = []
    pcm = speech()
    for _ in range(sessions):
        seen: dict[int, tuple[float, str]] = {}
        finals.append(seen)

        def emit(ev: Event, seen: dict[int, tuple[float, str]] = seen) -> None:
            if isinstance(ev, TextEvent) and ev.final:
                seen[len(seen)] = (time.perf_counter(), ev.text)

        core.open(cfg, emit=emit).push_audio(pcm, 16000)
    while core.has_work():  # frames and partial decodes, up to the end of speech
        core.step()
    ticks0, drafted0, accepted0 = core.ticks, core.drafted, core.accepted
    t0 = time.perf_counter()
    for s in core.sessions.values():
        s.commit()
    while core.has_work():
        core.step()
    lat = [max(t for t, _ in f.values()) - t0 for f in finals]
    drafted = core.drafted - drafted0
    return {
        "latency_ms": 1e3 * statistics.mean(lat),
        "ticks": core.ticks - ticks0,
        "acceptance": (core.accepted - accepted0) / drafted if drafted else 0.0,
        "texts": [[f[i][1] for i in sorted(f)] for f in finals],
    }


def engine_table(
    model: Gemma4Unified, drafter: Drafter, sessions: list[int], spec: SpecConfig
) -> None:
    print(
        "\n# engine: commit() -> last final text event (transcribe + translate, fixture speech),"
        " mean over sessions"
    )
    print("sessions  latency ms plain/spec  ticks plain/spec  acceptance")
    for n in sessions:
        engine_run(model, drafter, n, spec)  # warm-up
        plain = engine_run(model, None, n, spec)
        sp = engine_run(model, drafter, n, spec)
        if plain["texts"] != sp["texts"]:
            raise AssertionError("the engine's final texts differ with the drafter")
        print(
            f"{n:8d}  {plain['latency_ms']:10.1f}/{sp['latency_ms']:<12.1f} "
            f"{plain['ticks']:5}/{sp['ticks']:<10} {sp['acceptance']:10.1%}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint dir or bundled name (default: random tiny)"
    )
    ap.add_argument("--drafter", help="drafter checkpoint dir (default: random)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new", type=int, default=48, help="tokens to decode per stream")
    ap.add_argument("--context", type=int, default=200, help="context tokens before decoding")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--sessions", nargs="+", type=int, default=[1, 4], help="engine sessions (0: skip)"
    )
    args = ap.parse_args()
    configure_logging("warning")  # the engine logs each session at info
    if args.threads:
        torch.set_num_threads(args.threads)
    model = loader.load(args.model) if args.model else random_target()
    drafter = load_drafter(args.drafter, target=model) if args.drafter else random_drafter(model)
    spec = SpecConfig(k=args.k, k_min=1, k_max=args.k_max)
    if not args.drafter:
        print(
            "# NOTE: random drafter: acceptance is near zero, so these figures show the "
            "overhead of speculation, not its speed-up (pass --drafter for a trained one)"
        )
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; target {args.model or 'random tiny'}, "
        f"drafter {args.drafter or 'random'}; k={args.k} (max {args.k_max}), {args.new} tokens"
    )
    with torch.inference_mode():
        c = step_costs(model, drafter)
    print(
        f"# batch-1 cost: target step {c['target']:.2f} ms; drafting k=1 {c['draft1']:.2f} ms, "
        f"k=4 {c['draft4']:.2f} ms ({(c['draft4'] - c['draft1']) / 3:.2f} ms per extra step)"
    )
    print("batch  plain tok/s  spec tok/s  acceptance  forwards plain/spec  latency ms plain/spec")
    for b in args.batches:
        run(model, drafter, b, min(args.new, 8), spec, args.context)  # warm-up
        r = run(model, drafter, b, args.new, spec, args.context)
        print(
            f"{b:5d}  {r['plain_tok_s']:11.1f}  {r['spec_tok_s']:10.1f}  {r['acceptance']:10.1%}  "
            f"{r['plain_forwards']:8.0f}/{r['spec_forwards']:<10.0f} "
            f"{r['plain_latency_ms']:8.1f}/{r['spec_latency_ms']:.1f}"
        )
    sessions = [n for n in args.sessions if n > 0]
    if sessions:
        engine_model = model if args.model else loader.load("rawcast-tiny")
        engine_drafter = (
            drafter
            if args.model
            else load_drafter(args.drafter, target=engine_model)
            if args.drafter
            else random_drafter(engine_model)
        )
        what = args.drafter or "random (acceptance ~0: overhead only, no speed-up)"
        print(f"# engine target {args.model or 'rawcast-tiny'}, drafter {what}")
        engine_table(engine_model, engine_drafter, sessions, spec)


if __name__ == "__main__":
    main()
