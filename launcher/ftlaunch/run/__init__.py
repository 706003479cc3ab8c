"""Run: the run directory and what lives in it (run record, checkpoints, heartbeats, locks, resume rules)."""
