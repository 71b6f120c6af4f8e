"""Shared pytest configuration: tier markers are declared in pyproject.toml."""

from hypothesis import settings

# Hypothesis switches to its "ci" profile when $CI is set. Under any profile
# but "default", the settings of the parametrized property tests fall back
# through a chain that grows with every case until it overflows the stack
# (Hypothesis 6.170), so the suite runs with the same profile everywhere.
settings.load_profile("default")
