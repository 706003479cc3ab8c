"""Silence library messages that are noise for an ftlaunch user, and only those."""

import logging
import os
import warnings


def silence_library_noise() -> None:
    # bitsandbytes' CPU backend tries to fetch an optional kernel from the hub and
    # warns when it cannot; ftlaunch never downloads at run time, so this is expected.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Libraries calling each other's renamed transformers-5 attributes: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6",
                            category=FutureWarning)
    # DeepSpeed, imported by accelerate when installed, announces on every CPU-only
    # import that it fell back to the CPU; say so up front instead.
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
