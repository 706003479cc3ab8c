"""Detect: the hardware this machine has (GPUs, CPU, RAM, disk) and the cluster it is part of."""
