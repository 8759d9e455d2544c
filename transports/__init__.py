"""rawcast.transports: CLI, HTTP/WebSocket/WebRTC adapters around the pipeline."""
