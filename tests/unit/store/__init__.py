"""Unit tests of recnix.store."""
