"""Errors a user can cause. The CLI turns them into one paragraph and exit code 2."""

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Something the user can fix (a flag, a file, a plan that does not fit).

    The message is the whole story the user sees: what is wrong and what to do.
    Anything that is not a UserError is a bug and keeps its traceback.
    """
