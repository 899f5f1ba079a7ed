"""The project's exception."""


class MoEError(Exception):
    """A problem with the user's model, config or files, stated with its fix."""
