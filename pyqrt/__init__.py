"""pyqrt: a CPU-first 4-bit LLM inference runtime with a C core.

    import pyqrt
    model = pyqrt.load("smollm2.qrz")
    print(model.generate("The capital of France is", max_tokens=16, temperature=0))
"""
from ._native import isa_default, isa_supported
from .errors import ArchitectureError, ContextOverflowError, FormatError, QrzError, TokenizerError
from .model import Model, QrzFile, load, open_file

__all__ = ["load", "open_file", "Model", "QrzFile", "QrzError", "FormatError", "ArchitectureError",
           "ContextOverflowError", "TokenizerError", "isa_default", "isa_supported"]
__version__ = "0.1.0"
