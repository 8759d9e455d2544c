"""rawcast.model: config, loader, Gemma 4 Unified backbone, KV cache, tokenizer."""
