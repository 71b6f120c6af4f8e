"""Names the hooks, the service and the tools share: the system features a derivation
opts in with, and where a build finds its socket. Import-free (the hooks load it
before every build)."""

FEATURE = "recnix"  # requiredSystemFeatures: the full view (adds, nested builds)
FEATURE_READONLY = "recnix-readonly"  # queries over the build's own inputs only
OPT_IN_FEATURES = frozenset({FEATURE, FEATURE_READONLY})

# The directory of the nix-daemon socket an unmodified Nix client in a build looks for.
SANDBOX_SOCKET_DIR = "/nix/var/nix/daemon-socket"

# The programs in bin/ that Nix runs (pyproject.toml's script-files): the pre- and
# post-build hook (one sh script, two names), the build hook, and the bash script
# the hook hands an opted-in build to (recnix.hooks.channel).
HOOK_PROGRAMS = (
    "recnix-pre-build-hook",
    "recnix-post-build-hook",
    "recnix-build-hook",
    "recnix-hook-channel",
)
