#!/usr/bin/env bash
# Set up everything recnix needs on a Debian 12 machine (run as root):
# Debian packages (Nix 2.8, QEMU, mmdebstrap, busybox-static, bash-builtins), and a Python
# virtualenv in .venv with recnix, its test tools and uvloop (the daemon's
# optional fast event loop) installed from this tree.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and runs nix-daemon)" >&2
  exit 1
fi

packages=(nix-bin nix-setup-systemd busybox-static qemu-system-x86 qemu-utils
          mmdebstrap e2fsprogs openssh-client python3 python3-venv python3-pip
          ca-certificates pipx bash-builtins)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.recnix-installed
stale=false
for f in setup.sh pyproject.toml vm/pyproject.toml bin/*; do  # bin/ scripts are copied into .venv/bin
  [ "$f" -nt "$stamp" ] && stale=true
done
if [ ! -f "$stamp" ] || $stale; then
  # pip's output only when it fails (it is in .venv/pip.log either way)
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e '.[test,fast]' -e ./vm; } > .venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "setup.sh: pip failed (log: .venv/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "setup.sh: ready (.venv/bin/recnix, .venv/bin/recnix-vm, .venv/bin/pytest)"
