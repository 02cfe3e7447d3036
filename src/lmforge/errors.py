"""The one exception type users see.

Library code raises `LmforgeError` for anything a user can fix (a missing file, a
wrong flag, a mismatched tokenizer). The CLI prints its message without a traceback
and exits with status 2; anything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A problem with the user's input, stated with what was wrong and how to fix it."""
