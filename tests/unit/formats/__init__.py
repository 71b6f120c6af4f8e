"""Unit tests of recnix.formats."""
