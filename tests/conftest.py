"""Shared pytest configuration: tier markers are declared in pyproject.toml."""
