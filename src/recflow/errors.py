"""The exceptions recflow raises. Every message says what was wrong and how to fix it.

RecflowError
├── ConfigError          params.yaml is missing, malformed or inconsistent
├── InputFileError       an input file cannot be read at all (missing, wrong format, no header)
├── UnknownActionError   an action that params.yaml does not define
├── EmptyDataError       a stage has no data to work on (empty store, empty split)
├── ModelNotFoundError   a stage needs a trained model that is not there
├── EventLogUnavailableError  the event log (Redis, the local spool) cannot be reached or opened
├── StoreWriteError      the consumer cannot write what it read into the event store (disk, permissions)
├── CorruptStoreError    files of the event store cannot be read (`recflow store check` names them)
├── UserStateUnavailableError  the service's user state (Redis, the local log) cannot be read or written
├── NoProductionError   nothing is deployed yet, or nothing to roll back to (the registry)
├── RegistryError       the model registry (BentoML model store) is unreadable or inconsistent
└── DataVersionError    `dvc add` of the data folder failed (recflow.store.versions)
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


class EventLogUnavailableError(RecflowError):
    pass


class StoreWriteError(RecflowError):
    pass


class CorruptStoreError(RecflowError):
    """Store files that cannot be read: not the fault of the records being stored, and waiting does not heal it."""

    def __init__(self, message: str, files: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.files = files


class UserStateUnavailableError(RecflowError):
    pass


class NoProductionError(RecflowError):
    pass


class RegistryError(RecflowError):
    pass


class DataVersionError(RecflowError):
    pass
