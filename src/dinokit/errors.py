"""The one exception type dinokit raises for problems a user can fix (bad input, missing file, offline).

The CLI prints these as a one-paragraph message without a traceback; in a torchrun job, an error that
every process raises is printed once, by process 0 (`distributed.leave_shared_error_to_process_0`).
"""


class DinokitError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""


class ModelInputError(DinokitError, ValueError):
    """Images a model cannot take (a PIL image, uint8 pixels, (H, W, C), another device, a size that is
    not a multiple of the patch size): a DinokitError, and a ValueError as PyTorch's bad arguments."""


class SharedError(DinokitError):
    """A DinokitError that every process of a torchrun job raises alike, as it follows from values the
    processes exchanged (e.g. pretraining's check that they list the same images, or
    `distributed.compare_errors`, which finds the same error in every process): the CLI prints it
    once, on process 0 (`distributed.leave_shared_error_to_process_0`)."""


def require(checks) -> None:
    """Raise a DinokitError with the message of the first failed check: `checks` is an iterable of
    (ok, message) pairs, e.g. [(epochs >= 1, f"epochs must be >= 1, got {epochs}"), ...]."""
    for ok, message in checks:
        if not ok:
            raise DinokitError(message)
