"""One exception type for mistakes a user can fix.

The CLI prints a ``FedpalError`` as a single line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class FedpalError(Exception):
    """An error caused by input or environment, with a message a user can act on."""
