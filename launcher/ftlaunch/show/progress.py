"""The progress line rank 0 prints per logged step (into train.log and the terminal)."""

from __future__ import annotations

from ftlaunch.units import count, duration

PROGRESS_BAR_WIDTH = 20


def progress_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s,
                  elapsed_s: float, steps_done: int) -> str:
    """Rank 0's line per logged step: a bar, the step, loss, rate and time left (from
    the steps this launch has run: a resume does not count the earlier ones as fast)."""
    fraction = min(step / max_steps, 1.0) if max_steps > 0 else 0.0
    filled = round(fraction * PROGRESS_BAR_WIDTH)
    bar = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
    rate = f"{count(tokens_per_s)} tok/s" if tokens_per_s else "- tok/s"
    if steps_done > 0 and max_steps > step:
        eta = duration(elapsed_s / steps_done * (max_steps - step))
    else:
        eta = "-" if max_steps > step else "0 s"
    return (f"[{bar}] step {step}/{max_steps} {fraction:4.0%} | loss {loss:.4f} | "
            f"lr {lr:.2e} | {rate} | elapsed {duration(elapsed_s)} | ETA {eta}")
