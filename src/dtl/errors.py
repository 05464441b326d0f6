"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, an input the model cannot take) raises
a `DtlError` with a message that says what is wrong and what to do. The CLI prints that one
line and exits non-zero; `--debug` shows the traceback. It subclasses ValueError so library
users can catch it the ordinary way.
"""


class DtlError(ValueError):
    """An error caused by the user's input, with a message meant to be read by them."""
