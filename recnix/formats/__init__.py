"""Nix's data formats as plain functions: the ATerm ``.drv``, store paths, path signatures."""
