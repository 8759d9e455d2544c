"""Train an MTP drafter for a trained target (``rawcast train --drafter``).

The drafter (``rawcast.model.drafter``, section 6 of the spec) drafts from the
target's cached K/V and its last hidden state, so the recipe trains it on exactly
that, with the target frozen:

- one no-grad target forward per batch (the same data and prompts as the target's
  recipe) gives the final-normed hidden states, the K/V of the target's last
  sliding and last full layer, and the target's greedy token at every position;
- a draft query sits at every answer position p: the newest token ``tokens[p]``,
  ``h`` = the target's hidden at p - 1, attending to the target's K/V strictly
  before p (sliding layers: the last ``window + 1``), exactly as ``Drafter.propose``;
- ``k`` draft steps are unrolled at the same query position; step j is taught the
  target's greedy token at p + j (what verification accepts) and is fed the
  target's greedy token of the step before, as at inference when the drafts so far
  were accepted. Cross-entropy over answer positions, summed over steps.

The logged ``accept`` is the teacher-forced chain acceptance: the mean number of
leading draft tokens equal to the target's greedy ones, per query (at most ``k``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rawcast.model.config import FULL, SLIDING, TextConfig
from rawcast.model.drafter import Drafter, DrafterConfig, save
from rawcast.model.gemma4 import Gemma4Unified, Packed
from rawcast.model.prompt import PromptFormat
from rawcast.model.recipe import train as T


@dataclass(frozen=True)
class DrafterTrainConfig:
    steps: int = 1500
    batch: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.01
    k: int = 3  # draft steps unrolled per query
    layers: int = 2  # the last one attends to the target's full layer, the others sliding
    hidden: int = 128
    intermediate: int = 512
    export_every: int = 100
    max_minutes: float = 20.0
    seed: int = 4321
    threads: int = 1  # 0: torch's default


def drafter_config(
    target: TextConfig, layers: int, hidden: int, intermediate: int
) -> DrafterConfig:
    """A drafter shaped for ``target``: its head dims, rope and vocabulary."""
    if layers < 1:
        raise ValueError("a drafter needs at least one layer")
    types: tuple[str, ...] = (SLIDING,) * (layers - 1) + (FULL,)
    if not target.full_layers:
        types = (SLIDING,) * layers
    if not target.sliding_layers:
        types = (FULL,) * layers
    kv = [target.layer_kv_heads(i) for i in (*target.sliding_layers[-1:], *target.full_layers[-1:])]
    heads = math.lcm(*kv, 4)
    text = replace(
        target,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        layer_types=types,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
    )
    return DrafterConfig(text=text, backbone_hidden_size=target.hidden_size)


def init_drafter(drafter: Drafter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


@dataclass
class TargetFeatures:
    hidden: torch.Tensor  # (B, T, H) final-normed
    greedy: torch.Tensor  # (B, T) the target's argmax at each position
    kv: dict[bool, tuple[torch.Tensor, torch.Tensor]]  # sliding? -> K, V (B, Hkv, T, D)


@torch.no_grad()
def target_features(target: Gemma4Unified, p: Packed) -> TargetFeatures:
    tt = target.cfg.text
    keep: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layers in (tt.sliding_layers, tt.full_layers):
        if layers:
            keep[layers[-1]] = (torch.empty(0), torch.empty(0))
    h, _ = T.hidden_states(target, p, tap=-1, keep_kv=keep)
    greedy = T.output_logits(target, h).argmax(-1)
    kv = {tt.is_sliding(i): v for i, v in keep.items()}
    return TargetFeatures(h, greedy, kv)


def draft_losses(
    drafter: Drafter,
    target: Gemma4Unified,
    p: Packed,
    labels: torch.Tensor,
    feats: TargetFeatures,
    k: int,
) -> dict[str, torch.Tensor]:
    """Cross-entropy of ``k`` unrolled draft steps at every answer position."""
    b, t = labels.shape
    ignore = torch.full((b, k + 1), -100, dtype=labels.dtype, device=labels.device)
    lab = torch.cat([labels, ignore], dim=1)  # lab[:, p + j] for p + j past the end
    greedy = torch.cat([feats.greedy, torch.zeros_like(ignore)], dim=1)
    q_pos = p.positions[:, 1:]  # query at p = 1 .. t - 1
    base = lab[:, : t - 1] != -100  # p - 1 predicts an answer token: p is an answer position
    kpos = torch.where(p.valid, p.positions, torch.full_like(p.positions, -1))
    kv = {s: (kk, vv, drafter.visible(kpos, q_pos, s)) for s, (kk, vv) in feats.kv.items()}
    rope = drafter.rope(q_pos)
    e = drafter.embed_target(target, p.input_ids[:, 1:])
    h = feats.hidden[:, :-1]
    total = torch.zeros((), device=labels.device)
    chain = base.clone()
    accepted = torch.zeros((), device=labels.device)
    out: dict[str, torch.Tensor] = {}
    for j in range(k):
        x = drafter.draft_step(e, h, rope, kv)
        want = greedy[:, 1 + j : t + j]
        sel = base & (lab[:, 1 + j : t + j] != -100)
        logits = F.linear(x[sel], drafter.embed_tokens.weight).float()
        ce = F.cross_entropy(logits, want[sel]) if bool(sel.any()) else total * 0
        total = total + ce
        out[f"ce{j + 1}"] = ce.detach()
        hit = torch.zeros_like(sel)
        hit[sel] = logits.argmax(-1) == want[sel]
        chain = chain & hit
        accepted = accepted + chain.sum()
        e = drafter.embed_target(target, want)
        h = drafter.post_projection(x)
    out["loss"] = total
    out["accept"] = (accepted / base.sum().clamp(min=1)).detach()
    return out


def train_drafter(
    target: Gemma4Unified,
    data_root: Path,
    run_dir: Path,
    out_dir: Path,
    cfg: DrafterTrainConfig,
    log: Any = print,
) -> Path:
    """Train (or resume) a drafter for the frozen ``target``; export to ``out_dir``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if target.tokenizer is None:
        raise RuntimeError("the target checkpoint has no tokenizer.json")
    device = target.device
    target.eval().requires_grad_(False)
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = PromptFormat(target.tokenizer)
    dcfg = drafter_config(target.cfg.text, cfg.layers, cfg.hidden, cfg.intermediate)
    dcfg.check_target(target.cfg.text)
    torch.manual_seed(cfg.seed)
    drafter = Drafter(dcfg).to(device)
    init_drafter(drafter, cfg.seed)
    corpus = T.Corpus(data_root)
    if len(corpus) == 0:
        raise RuntimeError(f"no training shards under {data_root}: run `rawcast train` first")
    batches = T.TrainConfig(batch=cfg.batch, seed=cfg.seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = T.adamw(params, cfg.lr, cfg.weight_decay)
    run = T.RunState(run_dir, {"drafter": drafter, "opt": opt}, cfg,
                     lambda: export(drafter, out_dir), desc="drafter",
                     shown=("loss", "accept"), log=log)  # fmt: skip
    run.resume(device)
    (run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    drafter.train()
    while run.running():
        if run.step % 100 == 0:
            corpus.refresh()
        batch = T.make_batch(fmt, corpus, batches, run.step)
        p, labels = T.pack_batch(target, batch)
        feats = target_features(target, p)
        for g in opt.param_groups:
            g["lr"] = run.lr()
        out = draft_losses(drafter, target, p, labels, feats, cfg.k)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not run.record({n: float(v.detach()) for n, v in out.items()}):
            break
    run.close()
    return out_dir


def export(drafter: Drafter, out: Path) -> None:
    drafter.eval()
    T.publish(out, lambda tmp: save(drafter, tmp))
    drafter.train()


def train_command(
    target: str = "rawcast-tiny",
    data_dir: Path = Path("data/rawcast-tiny"),
    run_dir: Path = Path("runs/rawcast-tiny-drafter"),
    out_dir: Path | None = None,
    cfg: DrafterTrainConfig = DrafterTrainConfig(),
    log: Any = print,
) -> Path:
    """``rawcast train --drafter``: a drafter for ``target`` on the recipe's training data
    (generated by ``rawcast train``), written beside the bundled model by default."""
    from rawcast.model.loader import BUNDLED_DIR, load

    model = load(target, device="cuda" if torch.cuda.is_available() else "cpu")
    out = out_dir if out_dir is not None else BUNDLED_DIR / "rawcast-tiny-drafter"
    train_drafter(model, data_dir, run_dir, out, cfg, log=log)
    log(f"exported {out}")
    return out
