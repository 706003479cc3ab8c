"""Worker: the training processes `accelerate launch` starts (python -m ftlaunch.worker.main)."""
