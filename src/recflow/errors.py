"""The exceptions recflow raises. Every message says what was wrong and how to fix it.

RecflowError
├── ConfigError          params.yaml is missing, malformed or inconsistent
├── InputFileError       an input file cannot be read at all (missing, wrong format, no header)
├── UnknownActionError   an action that params.yaml does not define
├── EmptyDataError       a stage has no data to work on (empty store, empty split)
└── ModelNotFoundError   a stage needs a trained model that is not there
"""

from __future__ import annotations


class RecflowError(Exception):
    """Base of every error recflow raises on purpose; the CLI prints these without a traceback."""


class ConfigError(RecflowError):
    pass


class InputFileError(RecflowError):
    pass


class UnknownActionError(RecflowError):
    pass


class EmptyDataError(RecflowError):
    pass


class ModelNotFoundError(RecflowError):
    pass
