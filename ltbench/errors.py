"""The one exception type the CLI turns into a one-paragraph message and a non-zero exit."""


class UserError(Exception):
    """Bad input or a missing resource: the user can fix it, so no traceback is shown."""
