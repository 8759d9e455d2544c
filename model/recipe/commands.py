"""What ``rawcast train`` and ``rawcast eval`` do; the CLI parses argv and calls these.

``train_command`` regenerates the data (shards that exist are kept: generation is
deterministic), trains or resumes, and exports the checkpoint. ``eval_command``
loads a checkpoint and reports WER, chrF and caption accuracy on held-out data, offline
and streamed through the engine, beside the ASR baselines scored on the same clips.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path("data/rawcast-tiny")
DEFAULT_RUN = Path("runs/rawcast-tiny")
DRAFTER_RUN = Path("runs/rawcast-tiny-drafter")
MODES = ("offline", "streamed", "both")  # evaluate.MODES (that module loads torch)
FRONTENDS = ("fourier", "subwindow")  # train.FRONTENDS (same reason)
PRECISIONS = ("fp32", "bf16")  # train.PRECISIONS


def default_out() -> Path:
    from rawcast.model.loader import BUNDLED_DIR

    return BUNDLED_DIR / "rawcast-tiny"


def train_command(
    data_dir: Path = DEFAULT_DATA,
    run_dir: Path = DEFAULT_RUN,
    out_dir: Path | None = None,
    seed: int = 1234,
    train_clips: int = 10_500,
    workers: int = 2,
    steps: int = 5000,
    batch: int = 16,
    max_minutes: float = 70.0,
    threads: int = 1,
    procs: int = 1,
    prefetch: int = 0,
    frontend: str = "fourier",
    precision: str = "fp32",
    init_from: Path | None = None,
    task_mix: tuple[float, float, float] = (0.6, 0.2, 0.2),
    lr: float = 2e-3,
    vision_weight: float = 0.5,
    voice_shift: float = 0.0,
    voice_warp: float = 0.0,
    channel: float = 0.0,
    caption_corrupt: float = 0.0,
    count_weight: float = 0.0,
    ctc_weight: float = 1.0,
    layers: int = 4,
    hidden: int = 256,
    intermediate: int = 512,
    ctc_layer: int = 2,
    align_weight: float = 0.0,
    align_layers: tuple[int, ...] = (-1,),
    align_heads: int = 2,
    draw_from: int = 0,
    mixed: float = 0.0,
    mixed_align: bool = True,
    average_last: int = 0,
    log: Any = print,
) -> Path:
    from rawcast.model.recipe import data as D
    from rawcast.model.recipe import train as T

    dcfg = D.DataConfig(seed=seed, train_clips=train_clips)
    log(f"data: generating missing shards under {data_dir} (seed {seed}, {train_clips} clips)")
    paths = D.generate(data_dir, dcfg, workers=workers, progress=lambda n: log(f"  made {n}"))
    log(f"data: {len(paths)} shards, content hash {D.content_hash(paths[:1])[:16]} (first shard)")
    cfg = T.TrainConfig(
        steps=steps,
        batch=batch,
        max_minutes=max_minutes,
        seed=seed,
        threads=threads,
        frontend=frontend,
        precision=precision,
        init_from=str(init_from) if init_from is not None else "",
        task_mix=task_mix,
        lr=lr,
        vision_weight=vision_weight,
        voice_shift=voice_shift,
        voice_warp=voice_warp,
        channel=channel,
        caption_corrupt=caption_corrupt,
        count_weight=count_weight,
        ctc_weight=ctc_weight,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        ctc_layer=ctc_layer,
        align_weight=align_weight,
        align_layers=align_layers,
        align_heads=align_heads,
        draw_from=draw_from,
        mixed=mixed,
        mixed_align=mixed_align,
        average_last=average_last,
    )
    out = out_dir if out_dir is not None else default_out()
    T.train(data_dir, run_dir, out, cfg, dcfg, log=log, procs=procs, prefetch=prefetch)
    log(f"exported {out}")
    return out


def eval_command(
    model_name: str = "rawcast-tiny",
    data_dir: Path = DEFAULT_DATA,
    max_clips: int | None = None,
    n_scenes: int = 100,
    seed: int = 1234,
    json_out: Path | None = None,
    mode: str = "both",
    baselines: bool | None = None,
    threads: int = 0,
    seen_clips: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """``baselines``: score them on the same clips (None: when pocketsphinx is installed)."""
    import torch

    from rawcast.model.loader import load
    from rawcast.model.recipe import baselines as B
    from rawcast.model.recipe import data as D
    from rawcast.model.recipe.evaluate import evaluate, summary

    if threads > 0:
        torch.set_num_threads(threads)
    if not D.shards(data_dir, "eval"):
        log(f"data: generating the held-out data under {data_dir}")
        D.generate(data_dir, D.DataConfig(seed=seed), splits=("eval",), progress=log)
    model = load(model_name)
    result = evaluate(
        model, data_dir, seed=seed, max_clips=max_clips, n_scenes=n_scenes, mode=mode,
        seen_clips=seen_clips,
    )  # fmt: skip
    if baselines is None:
        baselines = B.pocketsphinx_available()
    if baselines:
        result["baselines"] = B.score_all(data_dir, max_clips)
    log(summary(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train`` and ``eval`` to the ``rawcast`` command line."""
    train = sub.add_parser(
        "train", help="generate the data and train rawcast-tiny (resumable; CUDA when present)"
    )
    train.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    train.add_argument(
        "--run-dir", type=Path, default=None, help=f"default: {DEFAULT_RUN} ({DRAFTER_RUN})"
    )
    train.add_argument("--out", type=Path, default=None, help="default: the bundled rawcast-tiny")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--train-clips", type=int, default=10_500)
    train.add_argument("--workers", type=int, default=2, help="data generation processes")
    train.add_argument("--steps", type=int, default=None, help="default: 5000 (drafter: 1500)")
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--max-minutes", type=float, default=None, help="default: 70 (drafter: 20)")
    train.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: torch's default)"
    )
    train.add_argument(
        "--procs",
        type=at_least(1),
        default=1,
        help="CPU processes that share each batch, --threads each (data-parallel; the "
        "batches and the run are those of one process); on the 2-core VM --threads 2 was "
        "faster (bench/train_step.py --sweep-procs)",
    )
    train.add_argument(
        "--prefetch",
        type=at_least(0),
        default=0,
        help="batches made ahead on a background thread while a step trains (default 0: "
        "each made when its step starts); the batches, hence the run, are the same either "
        "way. On the 2-core VM it was 4%% slower at --threads 2, since the thread takes "
        "the cores the step uses (bench/train_step.py --sweep-prefetch)",
    )
    train.add_argument(
        "--frontend",
        choices=FRONTENDS,
        default="fourier",
        help="how the audio projection and first MLP start (a new run only): fourier made "
        "the shipped checkpoint; subwindow (a 3-step spectrogram in dims of its own) did "
        "better in bench/frontend.py",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: the forward under bf16 autocast (weights and optimizer stay fp32); "
        "only where bf16 matmuls are fast (GPUs, CPUs with AMX): on a CPU without them it "
        "is many times slower (measure with bench/train_step.py)",
    )
    train.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start a new run from another run's weights (its run dir: model and heads) or "
        "from a checkpoint dir, with a fresh optimizer and schedule (a second phase)",
    )
    train.add_argument(
        "--task-mix",
        type=task_mix,
        default=(0.6, 0.2, 0.2),
        help="shares of transcribe,translate,caption examples (default: 0.6,0.2,0.2)",
    )
    train.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate (not with --drafter)"
    )
    train.add_argument(
        "--vision-weight",
        type=non_negative,
        default=0.5,
        help="weight of the training-only per-cell colour/shape loss on images (0: off)",
    )
    train.add_argument(
        "--count-weight",
        type=non_negative,
        default=0.0,
        help="weight of the training-only per-cell loss on each shape's group size (how "
        "many shapes of its colour and kind the picture has); default 0: no count head",
    )
    train.add_argument(
        "--align-weight",
        type=non_negative,
        default=0.0,
        help="weight of the training-only guided-attention loss: the first --align-heads "
        "heads of the --align-layers attend to the frames of the word each transcript "
        "token belongs to (default 0: off)",
    )
    train.add_argument(
        "--align-layers",
        type=layer_list,
        default=(-1,),
        help="comma-separated layer indices the alignment loss guides (-1: the last)",
    )
    train.add_argument("--align-heads", type=at_least(1), default=2)
    train.add_argument(
        "--ctc-weight",
        type=non_negative,
        default=1.0,
        help="weight of the training-only CTC phone loss on the audio positions of layer 2 "
        "(0: off; default 1)",
    )
    shape = train.add_argument_group(
        "model shape",
        "a new run's (rawcast-tiny: 4 layers, hidden 256, MLP 512; the issue's "
        "bound is 40 MB on disk, about 10M parameters in fp32); --init-from needs the same",
    )
    shape.add_argument("--layers", type=at_least(2), default=4)
    shape.add_argument("--hidden", type=at_least(64), default=256)
    shape.add_argument("--intermediate", type=at_least(64), default=512)
    shape.add_argument(
        "--ctc-layer", type=at_least(0), default=2,
        help="the layer whose audio positions the CTC loss reads (below --layers)",
    )  # fmt: skip
    train.add_argument(
        "--draw-from",
        type=at_least(0),
        default=0,
        metavar="N",
        help="train step k on the batch of step N + k: a phase started from an earlier run "
        "sees examples that run did not (give it the steps before it); default 0",
    )
    train.add_argument(
        "--mixed",
        type=share,
        default=0.0,
        metavar="SHARE",
        help="share of examples whose segment also holds the other modality, as in a call "
        "with a camera: a picture amid the speech of a transcription or translation, speech "
        "before the picture of a caption (the engine interleaves them); default 0",
    )
    train.add_argument(
        "--mixed-align",
        choices=("on", "off"),
        default="on",
        help="keep the guided-alignment windows of --mixed transcriptions, past the "
        "picture (on, the default); off drops them, as the shipped recipe's --mixed phases "
        "trained",
    )
    train.add_argument(
        "--voice-shift",
        type=share,
        default=0.0,
        help="share of speech examples resampled by 0.82-1.22x at training time (formants, "
        "pitch and tempo together: voices the synthesisers do not have); default 0",
    )
    train.add_argument(
        "--voice-warp",
        type=share,
        default=0.0,
        help="share of speech examples whose formants move by 0.85-1.18x at training time, "
        "pitch and timing kept (a vocal tract the voice does not have); default 0",
    )
    train.add_argument(
        "--channel",
        type=share,
        default=0.0,
        help="share of speech examples through a random channel at training time: a smooth "
        "random EQ, up to two notched bands and two silenced 40-120 ms spans (SpecAugment's "
        "masks on the waveform; timing kept); default 0",
    )
    train.add_argument(
        "--caption-corrupt",
        type=share,
        default=0.0,
        help="share of caption colour words the model reads as another colour (targets "
        "stay true), so shapes are named from the picture: held-out colour-shape pairs; "
        "default 0",
    )
    train.add_argument(
        "--average-last",
        type=at_least(0),
        default=0,
        metavar="N",
        help="the export at the run's last step is the mean of the model's weights at its "
        "last N saves (every 200 steps; checkpoint averaging), kept in RUN_DIR/tail; the "
        "run's state keeps the trained weights; default 0: the final weights",
    )
    train.add_argument(
        "--drafter",
        action="store_true",
        help="train the MTP drafter for --target instead (speculative decoding; needs the "
        "training data of a previous `rawcast train`); --steps, --batch, --max-minutes, "
        "--run-dir and --out then apply to the drafter",
    )
    train.add_argument(
        "--target", default="rawcast-tiny", help="with --drafter: the model it drafts for"
    )
    train.add_argument(
        "--recipe", default=None, metavar="NAME|FILE",
        help="run a list of phases, each from the one before, as one resumable command: "
        "'shipped' (the phases that made the bundled checkpoint) or a JSON file "
        "(model/recipe/phases.py); each phase runs in RUN_DIR/NN-name, and the phases set "
        "the training flags (--steps, --lr, --task-mix, ...)",
    )  # fmt: skip
    per_phase = {a.dest: a.default for a in train._actions if a.dest in RECIPE_SETS}
    train.set_defaults(func=_train, recipe_sets=per_phase)

    ev = sub.add_parser("eval", help="WER, chrF and caption accuracy on held-out data")
    ev.add_argument("--model", default="rawcast-tiny", help="bundled name or checkpoint dir")
    ev.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ev.add_argument("--max-clips", type=int, default=None)
    ev.add_argument("--scenes", type=int, default=100)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--json", type=Path, default=None, help="write the full result here")
    ev.add_argument(
        "--mode", choices=MODES, default="both",
        help="offline: one pass per clip; streamed: through the streaming engine (default: both)",
    )  # fmt: skip
    ev.add_argument(
        "--baselines", action=argparse.BooleanOptionalAction, default=None,
        help="also score pocketsphinx (and Whisper tiny with RAWCAST_WHISPER_DIR) on the same "
        "clips (default: when pocketsphinx is installed)",
    )  # fmt: skip
    ev.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ev.add_argument(
        "--seen-clips", type=count, default=0, metavar="N",
        help="also score N training clips offline (training voices and sentences): how well "
        "the model fits its training data, apart from the held-out voices (default 0)",
    )  # fmt: skip
    ev.set_defaults(func=_eval, default_log_level="warning")


RECIPE_SETS = frozenset({
    "steps", "max_minutes", "batch", "lr", "task_mix", "vision_weight", "voice_shift",
    "voice_warp", "caption_corrupt", "count_weight", "ctc_weight", "align_weight",
    "align_layers", "align_heads", "frontend", "precision", "layers", "hidden", "intermediate",
    "ctc_layer", "init_from", "drafter", "draw_from", "mixed", "mixed_align", "channel",
    "average_last", "train_clips",
})  # fmt: skip  # what a --recipe's phases decide (phases.PHASE_KEYS and the rest)


def _train(args: argparse.Namespace) -> int:
    if args.recipe is not None:
        given = [k for k, v in args.recipe_sets.items() if getattr(args, k) != v]
        if "drafter" in given:
            print("rawcast train: --recipe trains the model, not its drafter: run "
                  "`rawcast train --drafter` after it", file=sys.stderr)  # fmt: skip
            return 2
        if given:
            flag = "--" + given[0].replace("_", "-")
            print(f"rawcast train: --recipe sets each phase's {flag}: drop it (or write "
                  "a recipe file with the phases you want)", file=sys.stderr)  # fmt: skip
            return 2
    if args.drafter:
        from rawcast.model.recipe import drafter_train as DT

        DT.train_command(
            target=args.target,
            data_dir=args.data_dir,
            run_dir=args.run_dir or DRAFTER_RUN,
            out_dir=args.out,
            cfg=DT.DrafterTrainConfig(batch=args.batch, threads=args.threads, **_given(args)),
        )
        return 0
    from rawcast.model.recipe.train import RunError

    try:
        if args.recipe is not None:
            _train_recipe(args)
        else:
            _train_model(args)
    except RunError as e:
        print(f"rawcast train: {e}", file=sys.stderr)
        return 2
    return 0


def _train_recipe(args: argparse.Namespace) -> None:
    from rawcast.model.recipe import phases as P

    recipe = P.load(args.recipe)
    shared = dict(
        data_dir=args.data_dir, seed=args.seed, train_clips=args.train_clips,
        workers=args.workers, threads=args.threads, procs=args.procs,
        prefetch=args.prefetch,
    )  # fmt: skip
    out = args.out if args.out is not None else default_out()
    P.run(recipe, args.run_dir or DEFAULT_RUN, out,
          lambda **phase: train_command(**{**shared, **phase}))  # fmt: skip


def _train_model(args: argparse.Namespace) -> None:
    train_command(
        data_dir=args.data_dir,
        run_dir=args.run_dir or DEFAULT_RUN,
        out_dir=args.out,
        seed=args.seed,
        train_clips=args.train_clips,
        workers=args.workers,
        batch=args.batch,
        threads=args.threads,
        procs=args.procs,
        prefetch=args.prefetch,
        frontend=args.frontend,
        precision=args.precision,
        init_from=args.init_from,
        task_mix=args.task_mix,
        lr=args.lr,
        vision_weight=args.vision_weight,
        voice_shift=args.voice_shift,
        voice_warp=args.voice_warp,
        channel=args.channel,
        caption_corrupt=args.caption_corrupt,
        count_weight=args.count_weight,
        ctc_weight=args.ctc_weight,
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
        ctc_layer=args.ctc_layer,
        align_weight=args.align_weight,
        align_layers=args.align_layers,
        align_heads=args.align_heads,
        draw_from=args.draw_from,
        mixed=args.mixed,
        mixed_align=args.mixed_align == "on",
        average_last=args.average_last,
        **_given(args),
    )


def non_negative(arg: str) -> float:
    """A float >= 0 (``--vision-weight``, ``--ctc-weight``, ``--count-weight``)."""
    try:
        value = float(arg)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{arg!r}: give a number >= 0, e.g. 0.5")
    return value


def at_least(low: int) -> Callable[[str], int]:
    """A parser of whole numbers >= ``low``."""

    def parse(arg: str) -> int:
        try:
            value = int(arg)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{arg!r}: give a whole number >= {low}")
        return value

    return parse


count = at_least(0)  # --seen-clips


def share(arg: str) -> float:
    """A probability in [0, 1] (``--voice-shift``, ``--caption-corrupt``)."""
    value = non_negative(arg)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{arg!r}: give a share between 0 and 1, e.g. 0.5")
    return value


def task_mix(arg: str) -> tuple[float, float, float]:
    """``--task-mix``: three non-negative shares, normalised to sum to 1."""
    try:
        shares = [float(x) for x in arg.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise argparse.ArgumentTypeError(
            f"{arg!r}: give three non-negative shares for transcribe,translate,caption, "
            "e.g. 0.6,0.2,0.2"
        )
    total = sum(shares)
    return (shares[0] / total, shares[1] / total, shares[2] / total)


def layer_list(arg: str) -> tuple[int, ...]:
    """Comma-separated layer indices (``--align-layers``); negative counts from the end."""
    try:
        out = tuple(int(x) for x in arg.split(","))
    except ValueError:
        msg = f"expected layer indices like 2,3 or -1, got {arg!r}"
        raise argparse.ArgumentTypeError(msg) from None
    return out


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """--steps and --max-minutes when given (each mode has its own defaults)."""
    return {k: v for k in ("steps", "max_minutes") if (v := getattr(args, k)) is not None}


def _eval(args: argparse.Namespace) -> int:
    eval_command(
        model_name=args.model,
        data_dir=args.data_dir,
        max_clips=args.max_clips,
        n_scenes=args.scenes,
        seed=args.seed,
        json_out=args.json,
        mode=args.mode,
        baselines=args.baselines,
        threads=args.threads,
        seen_clips=args.seen_clips,
    )
    return 0
