"""Unit tests of recnix.daemon."""
