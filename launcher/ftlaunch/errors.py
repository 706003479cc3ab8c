"""Errors a user can cause (the CLI turns them into one paragraph and exit code 2),
and how ftlaunch's processes exit."""

import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Something the user can fix (a flag, a file, a plan that does not fit).

    The message is the whole story the user sees: what is wrong and what to do.
    Anything that is not a UserError is a bug and keeps its traceback.
    """


def exit_quickly(code: int) -> None:
    """sys.exit without the interpreter's last garbage collections walking every object
    that torch and transformers made (about 1.5 s for a process that trained): the
    objects are frozen out of the collector. atexit handlers and finalizers still run."""
    import gc

    gc.freeze()
    sys.exit(code)
