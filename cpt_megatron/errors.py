"""The one error type users see.

Library code raises `CptError` for anything a user can cause; the CLI turns it (and only it, plus a
missing or unreadable file) into one line and exit code 2. Any other exception is a bug and keeps its
traceback. The message says what was expected, what was found and what to do next. CptError is a
ValueError so callers that validate input can catch either.
"""

__all__ = ["CptError"]


class CptError(ValueError):
    """A user-facing error: one clear line, no traceback unless --debug."""
