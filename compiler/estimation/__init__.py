"""Estimation: parameters, memory, FLOPs, time and cost, as pure functions of frozen inputs."""
