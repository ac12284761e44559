"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A mistake in the user's data, files or settings.

    The message is one line saying what is wrong and how to fix it; entry
    points print it without a traceback and exit non-zero.
    """
