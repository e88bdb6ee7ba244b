"""The `edgeshard` command and `make demo`."""
