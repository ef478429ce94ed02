"""Errors that are the user's to fix: the command line prints their message as one line."""


class UserError(ValueError):
    """A bad argument, a missing or wrong file: the message names it and says what to do."""
