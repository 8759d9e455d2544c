"""Load a Gemma 4 Unified checkpoint directory into rawcast's backbone.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json``. The
module is built on the meta device and each tensor is read from the
memory-mapped file, converted to the target dtype/device and assigned, one at a
time: peak memory is the model plus one tensor, never a second full copy.

Both the on-disk key names and the names ``save_pretrained`` writes are
accepted (vision keys under ``model.vision_embedder.*`` or ``model.embed_vision.*``);
a tied ``lm_head`` may be absent. Missing, unexpected and mis-shaped tensors
fail with a message naming the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from rawcast.model.config import SOFT_TOKEN_BUDGETS, ConfigError, ModelConfig
from rawcast.model.gemma4 import Gemma4Unified, rope_inv_freq
from rawcast.model.tokenizer import Tokenizer

C = TypeVar("C")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or key."""


BUNDLED_DIR = Path(__file__).resolve().parent / "weights"  # the source tree in an editable install
BUNDLED = ("rawcast-tiny", "rawcast-tiny-drafter")

_IGNORED = (
    re.compile(r"^model\.embed_(audio|vision)\.embedding\."),  # stray hard-token tables
    re.compile(r".*rotary_emb\..*"),
)


def canonical_key(key: str) -> str | None:
    """Map a checkpoint key to rawcast's parameter name (None: ignore it)."""
    if any(p.match(key) for p in _IGNORED):
        return None
    for prefix in ("model.language_model.", "language_model.model.", "model.text_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    if key == "lm_head.weight":
        return key
    if key.startswith("model.embed_audio."):
        return "audio." + key.removeprefix("model.embed_audio.")
    for prefix in ("model.vision_embedder.", "model.embed_vision."):
        if key.startswith(prefix):
            rest = key[len(prefix) :].removeprefix("multimodal_embedder.")
            return "vision." + rest
    return "?" + key  # unexpected


def resolve(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if str(path_or_name) in BUNDLED:
        p = BUNDLED_DIR / str(path_or_name)
        if not (p / "config.json").exists():
            raise CheckpointError(
                f"the bundled model {path_or_name!r} is not in this installation ({p}); "
                "pass a checkpoint directory instead"
            )
        return p
    if not p.is_dir():
        raise CheckpointError(
            f"{path_or_name!r} is neither a checkpoint directory nor a bundled model "
            f"({', '.join(BUNDLED)})"
        )
    return p


def read_config(path: Path, parse: Callable[[dict[str, Any]], C]) -> C:
    """``parse(config.json)``; a missing, malformed or refused file is a CheckpointError."""
    f = path / "config.json"
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    try:
        return parse(d)
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from None


def load_config(path: Path) -> ModelConfig:
    return read_config(path, ModelConfig.from_dict)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        return [path / name for name in sorted(set(wmap.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def _check_and_assign(
    model: Gemma4Unified,
    items: Iterable[tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Assign (source, key, shape, read) tensors one by one, checking names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.lm_head is None
    state: dict[str, torch.Tensor] = {}
    for source, key, shape, read in items:
        name = canonical_key(key)
        if name is None or (name == "lm_head.weight" and tied):
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {key!r}")
        if shape != expected[name]:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {shape}, expected {expected[name]} "
                "from config.json"
            )
        state[name] = read().to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"missing tensor(s) {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=True, assign=True)
    t = model.cfg.text
    model.inv_freq_sliding = rope_inv_freq(t.rope_sliding, t.head_dim).to(device)
    model.inv_freq_full = rope_inv_freq(t.rope_full, t.global_head_dim).to(device)


def _file_items(
    path: Path,
) -> Iterator[tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    shape = tuple(sf.get_slice(key).get_shape())
                    yield f.name, key, shape, partial(sf.get_tensor, key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None


def from_state_dict(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Gemma4Unified:
    """Build the backbone from in-memory tensors (e.g. a transformers model's state_dict).

    Tensors already on ``device`` in ``dtype`` are shared, not copied.
    """
    with torch.device("meta"):
        model = Gemma4Unified(cfg)
    items = (("state_dict", k, tuple(v.shape), partial(lambda t: t, v)) for k, v in state.items())
    _check_and_assign(model, items, torch.device(device), dtype)
    return model.eval()


def load(
    path_or_name: str | Path = "rawcast-tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Gemma4Unified:
    """Load a checkpoint directory (config.json, *.safetensors, tokenizer.json) or bundled name."""
    path = resolve(path_or_name)
    cfg = load_config(path)
    dev = torch.device(device)
    with torch.device("meta"):
        model = Gemma4Unified(cfg)
    try:
        _check_and_assign(model, _file_items(path), dev, dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    tok = path / "tokenizer.json"
    model.tokenizer = Tokenizer.from_file(tok, cfg.tokens) if tok.exists() else None
    model.image_budget = image_budget(path, model.image_budget)
    return model.eval()


PROCESSOR_FILE = "preprocessor_config.json"  # where transformers' image processor reads it


def image_budget(path: Path, default: int) -> int:
    """The soft tokens per picture a checkpoint names (``max_soft_tokens`` in its
    preprocessor_config.json), or ``default`` without one."""
    f = path / PROCESSOR_FILE
    if not f.exists():
        return default
    try:
        budget = json.loads(f.read_text()).get("max_soft_tokens", default)
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{f} is not a JSON object: {e}") from None
    if budget not in SOFT_TOKEN_BUDGETS:
        raise CheckpointError(f"{f}: max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}")
    return int(budget)


def checkpoint_key(name: str) -> str:
    """rawcast parameter name -> the on-disk key transformers reads (inverse of canonical_key)."""
    if name.startswith("audio."):
        return "model.embed_audio." + name.removeprefix("audio.")
    if name == "vision.embedding_projection.weight":
        return "model.embed_vision.embedding_projection.weight"
    if name.startswith("vision."):
        return "model.vision_embedder." + name.removeprefix("vision.")
    if name == "lm_head.weight":
        return name
    return "model.language_model." + name


def write_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    key: Callable[[str], str],
    dtype: torch.dtype | None = None,
) -> Path:
    """config.json + model.safetensors: ``state`` under the checkpoint keys ``key(name)``,
    floating-point tensors cast to ``dtype`` when given."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        key(k): (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .contiguous()
        .cpu()
        for k, v in state.items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def save(model: Gemma4Unified, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors that both rawcast and transformers load.

    The tokenizer, when the model has one, is written as tokenizer.json, and the image
    processor's settings (its soft-token budget) as preprocessor_config.json.
    """
    out = write_checkpoint(path, model.cfg.to_dict(), model.state_dict(), checkpoint_key, dtype)
    if model.tokenizer is not None:
        model.tokenizer.save(out / "tokenizer.json")
    if model.cfg.vision is not None:
        processor = {
            "image_processor_type": "Gemma4UnifiedImageProcessor",
            "max_soft_tokens": model.image_budget,
            "patch_size": model.cfg.vision.patch_size,
            "pooling_kernel_size": model.cfg.vision.pooling_kernel_size,
        }
        (out / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
    return out
