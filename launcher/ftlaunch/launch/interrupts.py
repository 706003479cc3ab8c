"""How the launcher stops on a signal, and goes on when nobody reads its output.

While workers train, launch.process.run owns SIGTERM/SIGINT (the workers checkpoint and exit).
Before that (reading and tokenizing the data, which takes minutes on a large set,
waiting for other nodes) and in the other commands, Python's defaults would print a
KeyboardInterrupt traceback for Ctrl-C, and SIGTERM would kill the launcher alone,
leaving the tokenizer's pool processes orphaned with their memory. Here the first
signal raises Interrupted in the main thread: `finally` blocks release the run
directory's lock, cli.main stops every child process and prints one paragraph, and the
exit code is 128 + the signal's number, as documented for stops before a checkpoint. A
second signal ends the launcher and its children at once.

A closed stdout (`ftlaunch ... | head -1`, a `tee` that died) is not a reason to stop a
run or to change its exit code: output goes to /dev/null from then on, and train.log
keeps it all.
"""

from __future__ import annotations

import os
import signal
import sys

import click

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"pid": None, "phase": None, "received": None}


class Interrupted(BaseException):
    """A stop on a signal. A BaseException, like KeyboardInterrupt: library code's
    `except Exception` must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        text = f"stopped by {name} (exit code {self.exit_code})"
        return text + (f" {_state['phase']}" if _state["phase"] else ".")


def cause(exc: BaseException) -> Interrupted | None:
    """The Interrupted behind `exc`, if a signal started it: library clean-up code can
    raise its own error while the stop unwinds (datasets' pool map raises TimeoutError
    from its `finally`), and that error is not the story."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, Interrupted):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def install() -> None:
    """In the launcher's main thread, before anything slow starts."""
    _state.update(pid=os.getpid(), received=None, phase=None)
    for signum in _SIGNALS:
        signal.signal(signum, _handle)
    os.register_at_fork(after_in_child=_child_defaults)
    default_hook = sys.unraisablehook

    def unraisable(info) -> None:
        # A stop that landed in a finalizer or an at-fork callback (logging's, when the
        # tokenizer's pool forks) is ignored there: check() raises it again where it
        # counts, and its "Exception ignored" traceback would bury the one-line message.
        if not isinstance(info.exc_value, Interrupted):
            default_hook(info)

    sys.unraisablehook = unraisable


def _child_defaults() -> None:
    """A forked child (the tokenizer's pool, its manager) leaves Ctrl-C to the launcher,
    which stops it, and dies quietly of SIGTERM as the pool's own terminate() expects
    (a child that ignored it would leave that terminate() waiting forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def phase(text: str | None) -> None:
    """What a stop now means for the user, appended to the message: e.g. "before
    training started: ... re-run the same command"."""
    _state["phase"] = text


def _handle(signum, _frame) -> None:
    if _state["received"] is not None:
        stop_children()
        os._exit(128 + signum)
    _state["received"] = signum
    raise Interrupted(signum)


def check() -> None:
    """Raise a stop that was lost: a signal that lands while Python runs a finalizer (a
    pool connection's __del__, say) raises there, and Python ignores exceptions of
    finalizers. Called before anything that cannot be taken back (starting workers)."""
    if _state["received"] is not None:
        raise Interrupted(_state["received"])


def stop_children(timeout_s: float = 5.0) -> None:
    """Terminate every descendant of this process, killing those that linger."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def discard_output(err: bool = False) -> None:
    """The reader of stdout (or stderr) is gone: write to /dev/null from now on, so
    neither later lines nor the flush at exit fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2 if err else 1)
    finally:
        os.close(devnull)


def echo(message: str = "", err: bool = False) -> None:
    """click.echo that survives a closed pipe."""
    try:
        click.echo(message, err=err)
    except BrokenPipeError:
        discard_output(err)
