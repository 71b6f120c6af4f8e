"""Scenario .nix files shared by the host tier, the VM tier and nixos-tests; see README.md."""
