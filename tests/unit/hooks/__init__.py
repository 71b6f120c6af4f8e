"""Unit tests of recnix.hooks (and bin/'s sh hooks)."""
