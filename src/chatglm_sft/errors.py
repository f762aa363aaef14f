"""The one exception type users see.

Anything the user can fix (a missing file, a bad record, an unknown family) raises `UserError` with a message
that names the file or field. The CLI prints that message on one line and exits non-zero; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (files, options, data), explained in the message."""
