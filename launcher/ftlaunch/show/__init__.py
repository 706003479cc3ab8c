"""Show: what ftlaunch prints and draws: the plan table, the progress line, loss.png, doctor."""
