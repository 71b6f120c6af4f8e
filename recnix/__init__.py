"""recnix: recursive Nix as an add-on — a restricted per-build Nix daemon socket."""

__version__ = "0.1.0"
