"""The ``recnix`` command and what it does on the host: setup, doctor, bundle-nix,
the systemd unit, status."""
