"""Unit tests of the VM harness (vm/recnix_vm) and of the suite's own scheduling
(tests/scheduling.py)."""
