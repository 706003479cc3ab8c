"""Worker: the training processes `accelerate launch` starts (python -m ftlaunch.worker.main).

main runs one training; setup builds the trainer; callbacks, stopping and checkpointing
are what the Trainer calls back; rank_report and finish write the files at its end."""

# Before any worker module imports transformers (its trainer modules import bitsandbytes,
# whose noise ftlaunch.quiet turns down on import), whichever module is imported first.
import ftlaunch.quiet  # noqa: F401
