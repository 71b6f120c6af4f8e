"""What Nix runs: the pre-/post-build hooks and the build hook, their minimal Python
entry, and the control protocol they speak (standard library only: on every build)."""
