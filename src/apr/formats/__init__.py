"""Model file formats: GGUF (read via the `gguf` package) and apr's native `.apr`."""
