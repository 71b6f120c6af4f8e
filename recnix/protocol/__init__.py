"""Sans-IO codec for Nix's daemon worker protocol (no sockets in here)."""
