"""The hooks' minimal Python entry: ``python3 -I -S /path/to/recnix/hooks/entry.py KIND ARGS``.

KIND is ``pre-build-hook``, ``post-build-hook`` or ``build-hook`` (ARGS are
those of ``recnix KIND``), or ``ssh`` (the ssh shim of ``recnix build-hook``,
recnix/remote/sshshim/ssh). ``-S`` skips ``site``
(the scan of site-packages and its ``.pth`` files, ~13 ms with an editable
install, a few ms otherwise) and ``-I`` ignores ``PYTHON*`` variables and the
user's site directory. The recnix package is found next to this file, so any
Python 3.11+ works: the hooks need the standard library only.

The sh hook script (``bin/recnix-pre-build-hook``) runs this when nix-daemon's
environment names it (``RECNIX_HOOK_PYTHON``, ``RECNIX_HOOK_ENTRY``, written by
``recnix nix-conf --daemon-env`` and the NixOS module); otherwise it runs the
``recnix`` console script.
"""

import sys


def main(argv: list[str]) -> int:
    """Run the hook named by ``argv[0]`` with the rest of ``argv``."""
    if not argv or argv[0] not in ("pre-build-hook", "post-build-hook", "build-hook", "ssh"):
        print(
            "usage: entry.py pre-build-hook|post-build-hook|build-hook|ssh ARGS",
            file=sys.stderr,
        )
        return 2
    if argv[0] == "build-hook":
        from recnix.hooks import buildhook

        return buildhook.main(argv[1:])
    if argv[0] == "ssh":
        from recnix.remote import sshproxy

        return sshproxy.main(argv[1:])
    from recnix.hooks import prepost as hooks

    if argv[0] == "pre-build-hook":
        return hooks.pre_build_main(argv[1:])
    return hooks.post_build_main(argv[1:])


if __name__ == "__main__":
    # The directory that holds the recnix package (-I leaves the script's own
    # directory off sys.path; -S leaves site-packages off).
    sys.path.insert(0, __file__.rsplit("/", 3)[0] or "/")
    sys.exit(main(sys.argv[1:]))
