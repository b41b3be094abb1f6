"""The one exception type dinokit raises for problems a user can fix (bad input, missing file, offline).

The CLI prints these as a one-paragraph message without a traceback.
"""


class DinokitError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""


def require(checks) -> None:
    """Raise a DinokitError with the message of the first failed check: `checks` is an iterable of
    (ok, message) pairs, e.g. [(epochs >= 1, f"epochs must be >= 1, got {epochs}"), ...]."""
    for ok, message in checks:
        if not ok:
            raise DinokitError(message)
