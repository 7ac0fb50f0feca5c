"""Emission: the runtime config, the plan, the launch scripts and the manifest of a build directory."""
