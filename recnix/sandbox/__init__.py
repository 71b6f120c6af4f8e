"""A running build's sandbox: its processes (by pidfd), its socket, and making store
paths appear in it."""
