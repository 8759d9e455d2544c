"""rawcast.pipeline: media framing, sessions and the streaming engine (no I/O, no asyncio in the core)."""
