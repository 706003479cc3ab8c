"""Plan: from the user's request and the hardware to a Job: recipe, strategy, memory. Pure: no torch."""
