"""The one exception type dinokit raises for problems a user can fix (bad input, missing file, offline).

The CLI prints these as a one-paragraph message without a traceback.
"""


class DinokitError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""
