"""What can go wrong when fetching weights; each message is one line that names the source and says what to do.

Kept free of imports so that the command line can catch these without loading the download machinery.
"""


class DownloadError(OSError):
    """A download failed (network, HTTP status, missing repo or file)."""


class OfflineError(DownloadError, FileNotFoundError):
    """The file is not cached and the network may not be used (``HF_HUB_OFFLINE``/``VITKIT_OFFLINE``) or
    cannot be reached."""


class ChecksumError(DownloadError, ValueError):
    """The downloaded bytes do not match the publisher's checksum; nothing was kept."""
