"""Launch: the launcher process: checks, run files, the accelerate config, the multi-node meeting, the workers."""
