"""Exceptions. Every failure the C core reports arrives as one of these, with its message and what to do."""


class QrzError(Exception):
    """Base class of pyqrt's errors."""


class FormatError(QrzError, ValueError):
    """The file is not a readable .qrz: wrong magic or version, truncated, corrupt (checksum)."""


class ArchitectureError(QrzError, ValueError):
    """The file describes a model this runtime cannot run (unknown architecture, missing tensors)."""


class ContextOverflowError(QrzError, ValueError):
    """The sequence does not fit in the context window."""


class TokenizerError(QrzError, ValueError):
    """The file lacks the tokenizer data an operation needs."""
