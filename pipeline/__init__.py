"""rawcast.pipeline: media framing, sessions and the streaming engine (no I/O in the core)."""
