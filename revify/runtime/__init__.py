"""Runtime objects installed into converted modules."""
