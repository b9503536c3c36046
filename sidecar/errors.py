"""The single error tree of the sidecar, and the process exit codes.

Every failure raised by this package derives from :class:`SidecarError`. Store errors are split into
transient (retry later) and permanent by :func:`sidecar.store_errors.classify` alone, and each carries a
scope: ``object`` (this key only: park this file) or ``bucket`` (every request would fail the same way:
pause all uploads until the store answers well again). :class:`sidecar.store_health.StoreHealth` reads both.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_ABORTED = 130


class SidecarError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(SidecarError):
    """The configuration is invalid; the message is one line naming the variable."""


class JournalError(SidecarError):
    """The journal database cannot be opened, read or written."""


class SourceFileError(SidecarError):
    """A local file cannot be uploaded as it stands (vanished, unreadable, not a regular file).

    ``transient``: an OS error worth retrying (EMFILE, EIO, ESTALE, ...); ``detail`` keeps its strerror.
    """

    def __init__(self, reason: str, path: str, *, detail: str = "", transient: bool = False) -> None:
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.path = path
        self.detail = detail
        self.transient = transient


class StoreError(SidecarError):
    """An object-store operation failed. Carries the operation, the key and a hint for the operator."""

    transient: bool = False

    def __init__(
        self, message: str, *, operation: str, key: str = "", code: str = "", hint: str = "", scope: str = "object"
    ) -> None:
        where = f" for key {key!r}" if key else ""
        advice = f" (hint: {hint})" if hint else ""
        super().__init__(f"{operation} failed{where}: {message}{advice}")
        self.detail = message
        self.operation = operation
        self.key = key
        self.code = code
        self.hint = hint
        self.scope = scope  # "object" or "bucket"

    @property
    def error_class(self) -> str:
        """A short bounded label for metrics and logs (the S3 error code, or the exception kind)."""
        return self.code or type(self).__name__


class TransientStoreError(StoreError):
    """Worth retrying: connection trouble, timeouts, 5xx, throttling."""

    transient = True


class PermanentStoreError(StoreError):
    """Retrying will not help until an operator acts: auth, missing bucket, invalid key, bad request."""


class KeyExistsError(StoreError):
    """A conditional write (If-None-Match: *) found the key already present."""
