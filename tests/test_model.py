"""Backbone invariants: parity with transformers, incremental == one pass, rollback, batching."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import AUDIO, BOA, EOA, hf_logits, make_hf_model, prompt
from safetensors.torch import load_file, save_file

import rawcast.model as rm
from rawcast.model import Append, CacheSpec, KVCache
from rawcast.model.loader import CheckpointError

pytest.importorskip("transformers")

PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "window16": {},
    "window8-images-longer": {"sliding_window": 8},
    "12-layers-two-full": {"num_hidden_layers": 12},
    "alternating-no-kv-eq": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "attention_k_eq_v": False,
        "sliding_window": 32,
    },
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    out = {}
    for i, (name, over) in enumerate(PARITY_CONFIGS.items()):
        path = tmp_path_factory.mktemp(name)
        out[name] = (make_hf_model(path, seed=i, **over), path)
    return out


@pytest.fixture(scope="module")
def tiny(checkpoints: dict[str, tuple[Any, Path]]) -> rm.Gemma4Unified:
    return rm.load(checkpoints["window16"][1])


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers(checkpoints: dict[str, tuple[Any, Path]], name: str) -> None:
    """rawcast's one-pass logits equal transformers' (reference masks) within 1e-4 in fp32."""
    hf, path = checkpoints[name]
    model = rm.load(path)
    ids, audio, images = prompt(n_text=9, n_audio=13, image_cells=[20, 6], seed=3)
    ref = hf_logits(hf, ids, audio, images)
    out = model.logits(ids, audio=audio, images=images)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4


def test_parity_check_detects_mask_errors(checkpoints: dict[str, tuple[Any, Path]]) -> None:
    """transformers' plain path (image blocks bidirectional on every layer) is visibly different.

    This guards the parity test: a backbone with that mask bug would fail it.
    """
    hf, _ = checkpoints["window8-images-longer"]
    ids, audio, images = prompt(n_text=9, n_audio=13, image_cells=[20, 6], seed=3)
    ref = hf_logits(hf, ids, audio, images)
    tt = torch.zeros(1, ids.numel(), dtype=torch.long)
    tt[0, ids == 290] = 1
    assert audio is not None
    pv = torch.zeros(2, 20, 6912)
    pp = torch.full((2, 20, 2), -1, dtype=torch.long)
    for i, (c, p) in enumerate(images):
        pv[i, : c.shape[0]], pp[i, : c.shape[0]] = c, p
    with torch.no_grad():
        plain = hf(
            input_ids=ids.view(1, -1),
            mm_token_type_ids=tt,
            pixel_values=pv,
            image_position_ids=pp,
            input_features=audio.view(1, -1, 640),
            input_features_mask=torch.ones(1, audio.shape[0], dtype=torch.bool),
            use_cache=False,
        ).logits[0]
    assert (plain - ref).abs().max().item() > 1e-3


def _cache(model: rm.Gemma4Unified, slots: int = 4, branch: int = 16) -> KVCache:
    return KVCache(model.cfg.text, CacheSpec(slots=slots, full_capacity=512, branch_room=branch))


def _split_points(ids: torch.Tensor, rng: random.Random) -> list[tuple[int, int]]:
    """Chunks of random size that never split an image block."""
    chunks, i, n = [], 0, ids.numel()
    while i < n:
        j = min(n, i + rng.randint(1, 7))
        while j < n and ids[j - 1] == 290 and ids[j] == 290:  # keep image blocks whole
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


def _row(
    slot: int, ids: torch.Tensor, audio: torch.Tensor | None, images: list[Any], a: int, b: int
) -> Append:
    seg = ids[a:b]
    a_before = int((ids[:a] == AUDIO).sum())
    n_a = int((seg == AUDIO).sum())
    seg_audio = audio[a_before : a_before + n_a] if audio is not None and n_a else None
    imgs, seen = [], int((ids[:a] == 290).sum())
    count = 0
    for c, p in images:
        if count >= seen and count < seen + int((seg == 290).sum()):
            imgs.append((c, p))
        count += c.shape[0]
    return Append(slot=slot, tokens=seg, audio=seg_audio, images=imgs)


def test_incremental_equals_one_pass(tiny: rm.Gemma4Unified) -> None:
    """Media and text appended in random chunks give the one-pass logits at every chunk end."""
    ids, audio, images = prompt(n_text=9, n_audio=40, image_cells=[20], seed=5)
    ref = tiny.logits(ids, audio=audio, images=images)
    cache = _cache(tiny)
    rng = random.Random(0)
    for a, b in _split_points(ids, rng):
        out = tiny.step([_row(1, ids, audio, images, a, b)], cache)
        assert (out[0] - ref[b - 1]).abs().max().item() < 1e-4, (a, b)
    assert cache.length(1) == ids.numel()


def test_rollback_forgets_the_branch(tiny: rm.Gemma4Unified) -> None:
    """A decode branch appended, rolled back, then the stream continued == no branch at all."""
    ids, audio, _ = prompt(n_text=5, n_audio=30, image_cells=[], seed=6)
    ref = tiny.logits(ids, audio=audio)
    cut = int((ids == EOA).nonzero()[0]) - 10  # mid-audio
    cache = _cache(tiny, branch=16)
    tiny.step([_row(0, ids, audio, [], 0, cut)], cache)
    mark = cache.mark(0)
    branch = [EOA, 106, 107, 105, 17, 18]
    for tok in branch:  # closing tokens + greedy-like decode, one per step
        tiny.step([Append(0, [tok])], cache)
    cache.rollback(0, mark)
    assert cache.length(0) == cut
    for i in range(cut, ids.numel()):
        out = tiny.step([_row(0, ids, audio, [], i, i + 1)], cache)
        assert (out[0] - ref[i]).abs().max().item() < 1e-4


def test_ragged_batch_equals_each_slot_alone(tiny: rm.Gemma4Unified) -> None:
    """Rows of different kinds and lengths in one forward == each slot run on its own."""
    prompts = [
        prompt(n_text=4 + s, n_audio=8 * s, image_cells=[9] if s == 1 else [], seed=s)
        for s in range(3)
    ]
    refs = [tiny.logits(i, audio=a, images=im) for i, a, im in prompts]
    cache = _cache(tiny)
    pos = [0, 0, 0]
    rng = random.Random(1)
    plans = [_split_points(p[0], rng) for p in prompts]
    step = 0
    while any(step < len(pl) for pl in plans):
        rows, which = [], []
        for s, pl in enumerate(plans):
            if step < len(pl):
                a, b = pl[step]
                ids, audio, images = prompts[s]
                rows.append(_row(s, ids, audio, images, a, b))
                which.append((s, b))
        out = tiny.step(rows, cache)
        for r, (s, b) in enumerate(which):
            assert (out[r] - refs[s][b - 1]).abs().max().item() < 1e-4
            pos[s] = b
        step += 1
    assert pos == [p[0].numel() for p in prompts]


def test_ring_wraps_beyond_the_window(tiny: rm.Gemma4Unified) -> None:
    """A stream many times longer than the sliding window still equals the one-pass result."""
    window = tiny.cfg.text.sliding_window
    ids, audio, _ = prompt(n_text=3, n_audio=6 * window, image_cells=[], seed=7)
    ref = tiny.logits(ids, audio=audio)
    cache = _cache(tiny, branch=4)
    assert cache.sliding_capacity < ids.numel() // 3
    rng = random.Random(2)
    for a, b in _split_points(ids, rng):
        out = tiny.step([_row(2, ids, audio, [], a, b)], cache)
        assert (out[0] - ref[b - 1]).abs().max().item() < 1e-4


def test_chunk_longer_than_the_ring(tiny: rm.Gemma4Unified) -> None:
    """One append longer than the ring capacity (e.g. a big patch grid) stays exact."""
    ids, audio, images = prompt(n_text=3, n_audio=10, image_cells=[40], seed=8)
    ref = tiny.logits(ids, audio=audio, images=images)
    cache = _cache(tiny, branch=4)
    assert cache.sliding_capacity < 40
    eoi = int((ids == 293).nonzero()[0]) + 1
    tiny.step([_row(3, ids, audio, images, 0, eoi)], cache)
    for i in range(eoi, ids.numel()):
        out = tiny.step([_row(3, ids, audio, images, i, i + 1)], cache)
        assert (out[0] - ref[i]).abs().max().item() < 1e-4


def test_slot_reset_reuses_memory(tiny: rm.Gemma4Unified) -> None:
    """A reset slot behaves like a new one, without reallocating its buffers."""
    ids, audio, _ = prompt(n_text=6, n_audio=10, image_cells=[], seed=9)
    ref = tiny.logits(ids, audio=audio)
    cache = _cache(tiny)
    ptr = cache.k[0].data_ptr()
    tiny.step([Append(0, [5, 6, 7])], cache)
    cache.reset(0)
    out = tiny.step([_row(0, ids, audio, [], 0, ids.numel())], cache)
    assert (out[0] - ref[-1]).abs().max().item() < 1e-4
    assert cache.k[0].data_ptr() == ptr


def test_branch_longer_than_room_is_refused(tiny: rm.Gemma4Unified) -> None:
    """Rolling back more than branch_room tokens is an error, not silent corruption."""
    cache = _cache(tiny, branch=4)
    tiny.step([Append(0, [2, 5, 6])], cache)
    mark = cache.mark(0)
    tiny.step([Append(0, [7, 8, 9, 10, 11, 12])], cache)
    with pytest.raises(ValueError, match="branch_room"):
        cache.rollback(0, mark)


def test_media_count_mismatch_is_clear(tiny: rm.Gemma4Unified) -> None:
    """Placeholders without media (or the reverse) raise, naming the slot."""
    cache = _cache(tiny)
    with pytest.raises(ValueError, match="audio placeholders"):
        tiny.step([Append(0, [BOA, AUDIO, AUDIO], audio=torch.zeros(1, 640))], cache)


def test_bf16_runs_close_to_fp32(checkpoints: dict[str, tuple[Any, Path]]) -> None:
    """The same checkpoint in bf16 gives logits close to fp32 and the same top token."""
    path = checkpoints["window16"][1]
    ids, audio, images = prompt(n_text=9, n_audio=13, image_cells=[6], seed=3)
    f32 = rm.load(path).logits(ids, audio=audio, images=images)
    b16 = rm.load(path, dtype=torch.bfloat16).logits(ids, audio=audio, images=images)
    assert (f32 - b16).abs().max().item() < 0.15
    assert (f32.argmax(-1) == b16.argmax(-1)).float().mean().item() > 0.9


# --- loading -------------------------------------------------------------------------


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_sharded_and_renamed_checkpoints_load(
    checkpoints: dict[str, tuple[Any, Path]], tmp_path: Path
) -> None:
    """A sharded index and the in-memory vision key names load to the same logits."""
    hf, path = checkpoints["window16"]
    shard_dir = tmp_path / "sharded"
    hf.save_pretrained(shard_dir, max_shard_size="100KB")
    assert (shard_dir / "model.safetensors.index.json").exists()
    renamed = _copy_ckpt(path, tmp_path / "renamed")
    sd = load_file(renamed / "model.safetensors")
    sd = {k.replace("model.vision_embedder.", "model.embed_vision."): v for k, v in sd.items()}
    save_file(sd, renamed / "model.safetensors", metadata={"format": "pt"})
    ids, audio, images = prompt(n_text=5, n_audio=4, image_cells=[6], seed=1)
    base = rm.load(path).logits(ids, audio=audio, images=images)
    for p in (shard_dir, renamed):
        assert torch.equal(rm.load(p).logits(ids, audio=audio, images=images), base)


def test_loading_errors_name_the_problem(
    checkpoints: dict[str, tuple[Any, Path]], tmp_path: Path
) -> None:
    """Missing key, wrong shape, wrong model_type and a corrupt file fail clearly."""
    src = checkpoints["window16"][1]
    key = "model.language_model.layers.2.mlp.up_proj.weight"

    d = _copy_ckpt(src, tmp_path / "missing")
    sd = load_file(d / "model.safetensors")
    del sd[key]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.2\.mlp\.up_proj"):
        rm.load(d)

    d = _copy_ckpt(src, tmp_path / "shape")
    sd = load_file(d / "model.safetensors")
    sd[key] = torch.zeros(3, 3)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj.weight.*shape \(3, 3\)"):
        rm.load(d)

    d = _copy_ckpt(src, tmp_path / "type")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        rm.load(d)

    d = _copy_ckpt(src, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        rm.load(d)

    d = _copy_ckpt(src, tmp_path / "extra")
    sd = load_file(d / "model.safetensors")
    sd["model.language_model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*bogus"):
        rm.load(d)

    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        rm.load(tmp_path / "nowhere")


def test_saved_checkpoint_loads_in_transformers(tiny: rm.Gemma4Unified, tmp_path: Path) -> None:
    """rawcast's save() writes a checkpoint that transformers loads to the same logits."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    from rawcast.model.loader import save

    save(tiny, tmp_path / "ck")
    hf = Gemma4UnifiedForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    ids, audio, images = prompt(n_text=7, n_audio=9, image_cells=[6], seed=4)
    ref = hf_logits(hf, ids, audio, images)
    assert (tiny.logits(ids, audio=audio, images=images) - ref).abs().max().item() < 1e-4
    again = rm.load(tmp_path / "ck")
    same = again.logits(ids, audio=audio, images=images)
    assert torch.equal(same, tiny.logits(ids, audio=audio, images=images))


def test_a_checkpoint_names_its_image_budget_as_transformers_reads_it(
    tiny: rm.Gemma4Unified, tmp_path: Path
) -> None:
    """save() writes the soft tokens per picture in preprocessor_config.json, where
    transformers' image processor reads max_soft_tokens; load() reads it back; a
    checkpoint without the file gets the reference's 280; a bad value is refused."""
    from transformers.image_processing_base import ImageProcessingMixin

    from rawcast.model.loader import save

    assert tiny.image_budget == 280
    tiny.image_budget = 70
    try:
        save(tiny, tmp_path / "ck")
    finally:
        tiny.image_budget = 280
    hf, _ = ImageProcessingMixin.get_image_processor_dict(str(tmp_path / "ck"))
    assert hf["max_soft_tokens"] == 70 and hf["image_processor_type"].startswith("Gemma4")
    assert rm.load(tmp_path / "ck").image_budget == 70
    assert rm.load("rawcast-tiny").image_budget == 70  # the shipped model's, as trained
    (tmp_path / "ck" / "preprocessor_config.json").unlink()
    assert rm.load(tmp_path / "ck").image_budget == 280
    (tmp_path / "ck" / "preprocessor_config.json").write_text('{"max_soft_tokens": 100}')
    with pytest.raises(CheckpointError, match="max_soft_tokens must be one of"):
        rm.load(tmp_path / "ck")


def test_branches_share_a_prefix_and_leave_it_untouched(tiny: rm.Gemma4Unified) -> None:
    """Three branches over one slot's prefix decode in one forward, each equal to its own
    one-pass prompt; the prefix then continues as if they never existed."""
    window = tiny.cfg.text.sliding_window
    ids, audio, _ = prompt(n_text=3, n_audio=3 * window, image_cells=[], seed=11)
    cut = int((ids == EOA).nonzero()[0]) - 5
    spec = CacheSpec(slots=2, full_capacity=512, branch_room=12, branches=3)
    cache = KVCache(tiny.cfg.text, spec)
    tiny.step([_row(0, ids, audio, [], 0, cut)], cache)
    tails = [[EOA, 106, 17, 18], [EOA, 106, 40], [EOA, 107, 41, 42, 43]]
    refs = []
    for tail in tails:
        full = torch.cat([ids[:cut], torch.tensor(tail)])
        n_a = int((full == AUDIO).sum())
        refs.append(tiny.logits(full, audio=audio[:n_a] if audio is not None else None))
    # first tokens of each branch as one chunk, then one token per step, all in one forward
    out = tiny.step([Append(0, t[:2], branch=b) for b, t in enumerate(tails)], cache)
    for b in range(3):
        assert (out[b] - refs[b][cut + 1]).abs().max().item() < 1e-4
    for j in range(2, 5):
        rows = [Append(0, [t[j]], branch=b) for b, t in enumerate(tails) if j < len(t)]
        out = tiny.step(rows, cache)
        for r, row in enumerate(rows):
            assert row.branch is not None
            assert (out[r] - refs[row.branch][cut + j]).abs().max().item() < 1e-4
    for b in range(3):
        cache.reset_branch(b)
    assert cache.length(0) == cut
    ref = tiny.logits(ids, audio=audio)
    for i in range(cut, ids.numel()):
        out = tiny.step([_row(0, ids, audio, [], i, i + 1)], cache)
        assert (out[0] - ref[i]).abs().max().item() < 1e-4


def test_branch_room_is_enforced(tiny: rm.Gemma4Unified) -> None:
    """A branch longer than its buffer is refused instead of overwriting."""
    cache = KVCache(tiny.cfg.text, CacheSpec(slots=1, full_capacity=64, branch_room=4, branches=1))
    tiny.step([Append(0, [2, 5])], cache)
    tiny.step([Append(0, [7, 8, 9], branch=0)], cache)
    with pytest.raises(rm.cache.CacheFullError, match="branch_room"):
        tiny.step([Append(0, [10, 11], branch=0)], cache)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_step_equals_eager(checkpoints: dict[str, tuple[Any, Path]]) -> None:
    """The whole device step under torch.compile (what ``--compile`` runs): a ragged
    prefill with audio and an image, decodes, a rollback and more decodes give the eager
    logits and cache, and one graph per kind of step serves them all. (Few steps: each
    graph costs a C++ compile of about a minute on the CI machine.)"""
    import torch._dynamo

    from rawcast.transports.runtime import compile_step

    path = checkpoints["window16"][1]
    eager, fast = rm.load(path), rm.load(path)
    compile_step(fast)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    spec = CacheSpec(slots=3, full_capacity=256, branch_room=16)
    caches = {m: KVCache(m.cfg.text, spec) for m in (eager, fast)}
    prompts = [prompt(n_text=4, n_audio=24, image_cells=[9] if s else [], seed=s) for s in (0, 1)]
    prefill = [
        Append(slot, ids, audio=a, images=im)
        for slot, (ids, a, im) in zip((0, 2), prompts, strict=True)
    ]

    def run(m: rm.Gemma4Unified) -> list[torch.Tensor]:
        cache = caches[m]
        out = [m.step(prefill, cache)]
        marks = [cache.mark(0), cache.mark(2)]
        out += [m.step([Append(0, [17 + i]), Append(2, [30 + i])], cache) for i in range(3)]
        cache.rollback(0, marks[0])
        cache.rollback(2, marks[1])
        out += [m.step([Append(0, [40 + i]), Append(2, [50 + i])], cache) for i in range(3)]
        return out

    for a, b in zip(run(eager), run(fast), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    assert caches[eager].lengths == caches[fast].lengths
    for x, y in zip(caches[eager].k, caches[fast].k, strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # prefill, decode
