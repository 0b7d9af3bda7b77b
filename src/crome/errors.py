"""One exception type for everything a user can get wrong.

The CLI prints ``str(error)`` as a single line and exits with code 2.
"""


class CromeError(Exception):
    """A problem with the user's input or environment, described in one line."""
