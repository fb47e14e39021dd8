"""One exception type for mistakes a user can fix.

The CLI prints a ``FedpalError`` as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class FedpalError(Exception):
    """An error caused by input or environment, with a message a user can act on."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of a library's error message (its type name if it has none),
    for a one-line ``FedpalError`` that quotes it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
