"""One exception type for everything a user can get wrong.

The CLI prints ``str(error)`` as a single line and exits with code 2.
"""


class CromeError(Exception):
    """A problem with the user's input or environment, described in one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
