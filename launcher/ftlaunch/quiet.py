"""Silence library messages that are noise for an ftlaunch user, and only those."""

import logging
import warnings


# bitsandbytes' CPU backend tries to fetch an optional kernel from the hub and warns
# when it cannot; ftlaunch never downloads at run time, so this is expected. Set on
# import: transformers' trainer modules import bitsandbytes before any function of a
# worker runs, so the training module imports this first.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def silence_library_noise() -> None:
    # Libraries calling each other's renamed transformers-5 attributes: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6",
                            category=FutureWarning)
    # DeepSpeed, imported by accelerate when installed, warns on every CPU-only import that
    # it fell back to the CPU. Filtered, not avoided by setting DS_ACCELERATOR here: that
    # guess would reach the workers, whose accelerator the plan decides (launch.process.worker_env).
    logging.getLogger("DeepSpeed").addFilter(_NotTheCpuFallback())


class _NotTheCpuFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")
