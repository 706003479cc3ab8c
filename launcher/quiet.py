"""Silence library messages that are noise for an ftlaunch user, and only those."""

import logging


def silence_library_noise() -> None:
    # bitsandbytes' CPU backend tries to fetch an optional kernel from the hub and
    # warns when it cannot; ftlaunch never downloads at run time, so this is expected.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
