"""The one error type users see.

Library code raises `CptError` (or ValueError / FileNotFoundError) for anything a user can cause;
the CLI turns it into one line and exit code 2. The message says what was expected, what was found
and what to do next.
"""

__all__ = ["CptError"]


class CptError(Exception):
    """A user-facing error: one clear line, no traceback unless --debug."""
