"""Unit tests of recnix.protocol."""
