"""Test-only fault injection. Python imports this module at start-up when tests/faults is
on PYTHONPATH (a test sets it for the launcher; the workers inherit it), in place of
any site-wide sitecustomize; without FTLAUNCH_TEST_FAULT it does nothing.

In a worker, rank FTLAUNCH_TEST_FAULT_RANK (default 0) meets its fault as soon as its
heartbeat reaches step FTLAUNCH_TEST_FAULT_STEP:
  raise    a RuntimeError, in every launch (deterministic, like a batch that always
           runs out of memory);
  sigkill  a real SIGKILL to itself (what the OOM killer sends);
  sigstop  a real SIGSTOP to itself (frozen: a hung GPU, a stuck collective).
With FTLAUNCH_TEST_FAULT_ONCE (a file path), only the launch that creates that file
meets the fault: a transient failure.
  abort_at_exit (no step): the rank calls abort() when its interpreter exits, after
           everything else: a C++ "terminate called without an active exception" in a
           library's shutdown, once the adapter is written."""

import os
import signal
import sys

_FAULT = os.environ.get("FTLAUNCH_TEST_FAULT")
# A worker, not the `accelerate launch` agent whose arguments name the worker module too.
_WORKER = "ftlaunch.worker.main" in sys.orig_argv and "accelerate.commands.launch" not in sys.orig_argv

if _FAULT == "abort_at_exit" and _WORKER:
    import atexit

    if os.environ.get("RANK", "0") == os.environ.get("FTLAUNCH_TEST_FAULT_RANK", "0"):
        atexit.register(os.abort)  # registered first: runs last
elif _FAULT and _WORKER:
    from ftlaunch.run import heartbeat

    _beat = heartbeat.Writer.beat
    _STEP = int(os.environ["FTLAUNCH_TEST_FAULT_STEP"])
    _RANK = int(os.environ.get("FTLAUNCH_TEST_FAULT_RANK", "0"))
    _ONCE = os.environ.get("FTLAUNCH_TEST_FAULT_ONCE")

    def _first_time() -> bool:
        try:
            os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def _faulty_beat(self, step, phase):
        if step >= _STEP and self.rank == _RANK and (not _ONCE or _first_time()):
            if _FAULT == "raise":
                raise RuntimeError(f"injected fault at step {step}")
            os.kill(os.getpid(), signal.SIGKILL if _FAULT == "sigkill" else signal.SIGSTOP)
        return _beat(self, step, phase)

    heartbeat.Writer.beat = _faulty_beat
