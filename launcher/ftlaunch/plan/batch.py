"""How a global batch splits over the processes: the micro-batches a plan may try, the
note when a recipe's batch had to change, and the refusal when an asked one must.

An objective may need more than one example per device and micro-batch (KTO's KL
estimate pairs each completion with another of the same micro-batch: objectives'
least_micro_batch). A recipe's global batch that gives a process fewer is raised to
the least that does, and the plan says so; an asked one (--global-batch-size) is
refused with the values that work, as one that does not divide over the processes is.
"""

from __future__ import annotations

from ftlaunch.errors import UserError
from ftlaunch.plan import objectives

MICRO_BATCHES = (16, 8, 4, 2, 1)  # tried largest first


def micro_batches(global_batch: int, world: int, least: int = 1) -> list[int]:
    """Micro-batches that divide the per-process share of the global batch, largest first;
    at least `least` (the share is raised to it when smaller). A share no power of two of
    at least `least` divides (KTO's 15 on each of 3 processes) takes its divisors that are
    (15, 5, 3), so the batch stays as asked; a prime share leaves only itself."""
    share = max(global_batch // world, least)
    options = [m for m in MICRO_BATCHES if least <= m <= share and share % m == 0]
    return options or [m for m in range(share, least - 1, -1) if share % m == 0]


def choices(global_batch: int, world: int, least: int = 1) -> list[int]:
    """The global batches nearest to `global_batch` that divide over `world` processes and
    give each at least `least` examples."""
    below = global_batch // world * world
    return [b for b in (below, below + world) if b >= world * least] or [world * least]


def _raised_to(plan, asked: int) -> int | None:
    """The least micro-batch `asked` was raised to meet (None: not raised for one)."""
    least = objectives.get(plan.objective).least_micro_batch
    return least if least > 1 and asked < plan.num_processes * least else None


def note(plan) -> str | None:
    """Why the plan's global batch is not the recipe's (None: it is)."""
    asked = plan.batch_adjusted_from
    if asked is None:
        return None
    n = plan.num_processes
    if least := _raised_to(plan, asked):
        return (f"the recipe's global batch {asked} gives {n} processes fewer than "
                f"{least} examples each, which {plan.objective.upper()} needs per "
                f"micro-batch: using {plan.global_batch_size} (--global-batch-size chooses "
                "another)")
    return (f"the recipe's global batch {asked} does not divide over {n} "
            f"processes: using {plan.global_batch_size} (--global-batch-size with a multiple "
            f"of {n} chooses another)")


def check(plan, asked: bool) -> None:
    """Refuse a global batch the user asked for (--global-batch-size) that the plan had to
    change. Rounding it would silently change what they chose: samples per update, steps
    per epoch, the learning-rate schedule. A recipe's value was written for no particular
    machine (16 on 3 or 32 GPUs is nobody's mistake), so the plan adjusts it and says so
    (note) in `ftlaunch plan` and in the table before training."""
    if not asked or plan.batch_adjusted_from is None:
        return
    wanted, world = plan.batch_adjusted_from, plan.num_processes
    least = objectives.get(plan.objective).least_micro_batch
    options = " or ".join(f"--global-batch-size {b}" for b in choices(wanted, world, least))
    if _raised_to(plan, wanted):
        raise UserError(f"--global-batch-size {wanted} gives the {world} processes of this plan "
                        f"fewer than {least} examples each, and {plan.objective.upper()} needs "
                        f"{least} per micro-batch on every process (its KL estimate pairs "
                        f"each completion with another of the batch). Use {options}, or fewer "
                        "processes (--gpus).")
    raise UserError(f"--global-batch-size {wanted} does not divide over the {world} processes of "
                    f"this plan (every process takes the same share of each step). Use {options}, "
                    f"or a process count (--gpus) that divides {wanted}.")
