"""apr: run local quantized LLMs and prove they are ready to ship."""

__version__ = "0.1.0"
