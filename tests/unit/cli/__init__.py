"""Unit tests of recnix.cli."""
