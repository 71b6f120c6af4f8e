"""Unit tests of recnix.remote."""
