"""Configuration: every key declared once (config-keys.toml), the loader, the typed
settings generated from it, and the names hooks, service and tools share."""
