"""The errors every layer raises for the same causes, so that each maps to one exit code (docs/failures.md).

Kept free of imports so that the command line can catch them without loading the machinery that raises them.
"""

from __future__ import annotations


class DownloadError(OSError):
    """Fetching weights or a data set failed (network, HTTP status, missing repo or file, checksum): the
    environment stopped the work, not the input (exit 1)."""


class OfflineError(DownloadError, FileNotFoundError):
    """The file is not cached and the network may not be used (``HF_HUB_OFFLINE``/``VITKIT_OFFLINE``) or
    cannot be reached. ``what`` is what was asked for, ``problem`` what is missing and why, and ``advice``
    how to get it onto this machine; the message is the three on one line."""

    def __init__(self, what: str, problem: str, advice: str) -> None:
        super().__init__(f"{what}: {problem}: {advice}")
        self.what, self.problem, self.advice = what, problem, advice

    def __reduce__(self):  # picklable, across processes
        return type(self), (self.what, self.problem, self.advice)


class ChecksumError(DownloadError, ValueError):
    """Downloaded bytes that are damaged: they do not match the publisher's checksum (nothing was kept), or a
    cached file is cut short or does not match its name. A corrupt file, like a corrupt checkpoint (exit 2)."""


class WorkStopped(RuntimeError):
    """Work that had started could not go on for a cause found part-way (an image that cannot be decoded,
    first read mid-run): exit 1, with what was saved and how to continue in the message."""


class ExportMismatch(Exception):
    """An exported model (ONNX, int8, torch.export) disagrees with the eager model beyond the tolerance on the
    validation images; nothing was written (exit 4)."""


def exit_code(error: BaseException) -> int | None:
    """The exit code docs/failures.md gives ``error``'s cause, or None for an error that is a bug (a traceback):
    2 for bad input (a bad value, a missing or corrupt file: ``ValueError``, ``FileNotFoundError``, checked
    first, so that a damaged download is 2 like any corrupt file); 1 for what stopped the work from outside the
    input (a download that could not be made, a directory or disk that failed, :class:`WorkStopped`); 4 for
    an export that failed its validation (:class:`ExportMismatch`)."""
    if isinstance(error, WorkStopped):
        return 1
    if isinstance(error, ExportMismatch):
        return 4
    if isinstance(error, OfflineError):  # also a FileNotFoundError, but the network's doing, not the input's
        return 1
    if isinstance(error, (ValueError, FileNotFoundError)):
        return 2
    if isinstance(error, OSError):  # DownloadError included
        return 1
    return None
