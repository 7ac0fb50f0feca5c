"""The runtime: reads a build directory written by the compiler, trains and evaluates."""
