"""User-facing errors.

A :class:`VFSError` carries one clear sentence for the person who gave the input. The command
line prints it on stderr and exits non-zero without a traceback; library callers can catch it.
"""


class VFSError(Exception):
    """An error caused by the user's input, with a message meant to be shown as is."""


class InputError(VFSError):
    """An input file or argument cannot be used (missing, unreadable, wrong kind of data)."""


class DependencyError(VFSError):
    """Something the requested step needs is not installed or not available on this machine
    (an optional package such as TotalSegmentator, or its model weights)."""


class SegmentationError(VFSError):
    """TotalSegmentator ran but could not produce a usable segmentation (out of memory, its worker
    processes died, it stopped, or its output does not fit the CT)."""


class WeightsMissingError(DependencyError):
    """TotalSegmentator is installed but the model weights a run needs are not on this computer,
    and downloading them was not allowed (the caller may ask the user, then allow it)."""
