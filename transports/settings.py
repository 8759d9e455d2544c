"""Server settings: one frozen dataclass, filled by the CLI from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "rawcast-tiny"
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "torch"  # or "onnx" (see runtime.py)
    onnx_dir: str | None = None
    threads: int = 0
    drafter: str | None = None  # MTP drafter checkpoint (speculative decoding, torch backend)
    compile: bool = False  # torch.compile the decoder stack
    max_sessions: int = 8
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    allowed_origins: tuple[str, ...] = ()  # browsers from other origins; "*" allows any
    max_message_bytes: int = 16 * 1024 * 1024  # a base64 append of 15 MiB PCM fits
    max_sessions_per_key: int = 0  # 0: no per-key limit
    ice_servers: tuple[str, ...] = ()  # stun:/turn: URLs advertised to WebRTC clients
    turn_username: str | None = None
    turn_credential: str | None = None
    # A TURN server's shared secret (coturn's static-auth-secret): each client gets its own
    # credentials that expire after turn_ttl_s, instead of the static pair above.
    turn_secret: str | None = None
    turn_ttl_s: int = 86_400
    drain_timeout_s: float = 30.0
    vad: bool = True
    extra: dict[str, str] = field(default_factory=dict)
