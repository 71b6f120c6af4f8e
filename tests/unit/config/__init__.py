"""Unit tests of recnix.config."""
