"""The one exception type the command line turns into a single ``error:`` line on stderr."""


class ToolError(Exception):
    """A problem with the user's input or files, worded as one line that says what to do."""
