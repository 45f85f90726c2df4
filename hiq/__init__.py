"""hiq: layer-wise high-impact parameter ratio optimization for post-training quantization of LLMs."""

__version__ = "0.1.0"
