"""The step on ONNX Runtime: export, parity with torch, and the engine on onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_model import FIXTURES, tiny_model

from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.loader import load
from rawcast.model.onnx_step import (
    GRAPH_FILE,
    META_FILE,
    OnnxExportError,
    OnnxStep,
    ensure_exported,
    fingerprint,
)
from rawcast.transports.cli import main


@pytest.fixture(scope="module")
def model() -> Gemma4Unified:
    return load("rawcast-tiny")


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory: pytest.TempPathFactory, model: Gemma4Unified) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export-onnx", "rawcast-tiny", str(out)]) == 0
    return out


def test_export_writes_a_graph_with_the_cache_as_inputs_and_outputs(
    graph_dir: Path, model: Gemma4Unified
) -> None:
    import onnx

    meta = json.loads((graph_dir / META_FILE).read_text())
    assert meta["fingerprint"] == fingerprint(model)
    g = onnx.load(str(graph_dir / GRAPH_FILE)).graph
    n = model.cfg.text.num_hidden_layers
    inputs = [i.name for i in g.input]
    outputs = [o.name for o in g.output]
    assert {f"past_k_{i}" for i in range(n)} <= set(inputs)
    assert outputs == ["logits"] + [f"present_{kv}_{i}" for i in range(n) for kv in "kv"]
    # batch, tokens and cache lengths are symbolic, not baked in
    dims = {i.name: i.type.tensor_type.shape.dim for i in g.input}
    assert all(d.dim_param for d in dims["input_ids"])
    assert dims["past_k_0"][0].dim_param and dims["past_k_0"][2].dim_param


def _rows(model: Gemma4Unified, k: int, g: torch.Generator) -> list[Append]:
    tk = model.cfg.tokens
    text = [t for t in range(30, 200)]
    rows = []
    for slot in range(3):
        n = 1 + (3 * k + slot) % 7
        if slot == 0:
            audio = torch.randn(n, 640, generator=g) * 0.1
            rows.append(Append(slot, [tk.audio] * n, audio=audio))
        else:
            rows.append(Append(slot, [text[(k * 7 + slot + i) % len(text)] for i in range(n)]))
    return rows


def test_onnx_step_matches_torch_over_steps_rollback_and_branches(
    graph_dir: Path, model: Gemma4Unified
) -> None:
    ox = OnnxStep(model, graph_dir / GRAPH_FILE)
    spec = CacheSpec(slots=3, full_capacity=300, branch_room=16, branches=4)
    ct = KVCache(model.cfg.text, spec, device=model.device, dtype=model.dtype)
    co = KVCache(model.cfg.text, spec, device=model.device, dtype=model.dtype)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    marks: list[int] = []
    for k in range(10):
        rows = _rows(model, k, g)
        if k == 4:
            marks = [ct.mark(s) for s in range(3)]
        a, b = model.step(rows, ct), ox.step(rows, co)
        worst = max(worst, float((a - b).abs().max()))
        if k == 6:  # throw the last three steps away on both
            for s in range(3):
                ct.rollback(s, marks[s])
                co.rollback(s, marks[s])
    tk = model.cfg.tokens
    cells = torch.rand(4, 6912, generator=g)
    pos = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    mixed = [
        Append(0, [40, 41, 42], branch=0),  # a branch over slot 0's prefix
        Append(1, [43], branch=1),
        Append(2, [tk.boi, *[tk.image] * 4, tk.eoi], images=[(cells, pos)]),
    ]
    for _ in range(2):
        a, b = model.step(mixed, ct), ox.step(mixed, co)
        worst = max(worst, float((a - b).abs().max()))
        mixed = [Append(0, [44], branch=0), Append(1, [45], branch=1), Append(2, [46])]
    assert worst < 1e-3
    assert ct.lengths == co.lengths and ct.branch_lengths == co.branch_lengths
    for i in range(model.cfg.text.num_hidden_layers):
        assert torch.allclose(ct.k[i], co.k[i], atol=1e-4) and torch.equal(ct.pos_full, co.pos_full)


def test_the_engine_on_onnxruntime_gives_the_torch_text(
    graph_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wav = str(FIXTURES / "heldout_ked_diphone.wav")
    out = {}
    for backend in ("torch", "onnx"):
        capsys.readouterr()
        args = ["transcribe", wav, "--format", "json", "--translate", "es"]
        assert main([*args, "--backend", backend, "--onnx-dir", str(graph_dir)]) == 0
        out[backend] = json.loads(capsys.readouterr().out)["segments"]
    assert out["torch"] and out["torch"][0]["text"] and out["torch"][0]["translation"]
    assert out["onnx"] == out["torch"]


def test_a_graph_of_another_model_is_refused(graph_dir: Path) -> None:
    with pytest.raises(OnnxExportError, match="another model"):
        ensure_exported(tiny_model(), graph_dir)


def test_backend_onnx_needs_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    wav = str(FIXTURES / "heldout_ked_diphone.wav")
    assert main(["transcribe", wav, "--backend", "onnx", "--dtype", "bf16"]) == 2
    assert "use --dtype fp32" in capsys.readouterr().err


def test_compile_is_for_the_torch_backend(capsys: pytest.CaptureFixture[str]) -> None:
    wav = str(FIXTURES / "heldout_ked_diphone.wav")
    assert main(["transcribe", wav, "--backend", "onnx", "--compile"]) == 2
    assert "--compile applies to --backend torch only" in capsys.readouterr().err
