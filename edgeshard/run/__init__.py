"""Running on devices: the profiler, the runtime, metrics and reproduce."""
