"""Errors that are the user's to act on: the command line prints their message as one line."""

from __future__ import annotations

import errno


class UserError(ValueError):
    """A bad argument, a missing or wrong file: the message names it and says what to do."""


class RunStopped(RuntimeError):
    """A run that cannot go on (its loss diverged): the message says where it stopped, what is
    kept and what to try."""


def out_of_space(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from, is a full disk: ``ENOSPC`` from Python,
    or the same message from TensorFlow's or TensorStore's own file writers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
