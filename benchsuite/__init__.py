"""benchsuite: post-training quantization of vision transformers, measured under one protocol."""

from benchsuite.errors import BenchsuiteError

__version__ = "0.1.0"

__all__ = ["BenchsuiteError", "__version__"]
