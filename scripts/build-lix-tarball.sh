#!/usr/bin/env bash
# Build a Lix tarball for recnix's `lix` suite from a Lix source tree:
#   lix-<version>-trixie-x86_64.tar.xz  (Lix installed with prefix /usr/local, sysconfdir /etc;
#                                       entries relative to /, only what runs, ELF files stripped)
#   runtime-packages.txt                (the trixie packages its binaries link against)
# tests/versions looks for them in ../shared/lix or $RECNIX_LIX_DIR (vm/recnix_vm/lix.py).
#
# usage: scripts/build-lix-tarball.sh LIX_SOURCE_DIR [OUT_DIR]
#   LIX_SOURCE_DIR  a Lix source tree (e.g. `git archive 2.95.3` of lix-project/lix, unpacked)
#   OUT_DIR         where the two files go (default: ../shared/lix next to this tree)
# env: WORK (default /var/tmp/recnix-lix-build): the build rootfs and its cache;
#      JOBS (default 2); SETUP_ONLY=1 stops after `meson setup`.
# Run as root on a Debian host with recnix's setup (./setup.sh: mmdebstrap, the venv) and a
# reachable Debian mirror (trixie, with source packages) and PyPI.
#
# How (every step as the Lix 2.95.3 tarball in ../shared/lix was made, see its README):
#  1. a trixie root filesystem of its own (recnix_vm.rootfs, cache under $WORK; the base
#     tarball of recnix's default cache is reused), trixie's toolchain installed there;
#  2. capnproto 1.1.0 (trixie's source) rebuilt as static PIC C++20 libraries: trixie's
#     libkj-async is built as C++17 and lacks the coroutines Lix needs;
#  3. stand-ins for what Debian does not package (scripts/lix-stubs/): editline (readline =
#     getline: no line editing in `nix repl`), lowdown (help shown as raw Markdown), lix-doc
#     (no doc-comments in `:doc`; its rnix/rowan crates would be downloaded by meson);
#     python-frontmatter and pycapnp (Lix's code generators) from PyPI;
#  4. meson setup (the options below), ninja, install into a stage directory;
#  5. the tarball (mtimes: the newest file of the source tree, for a reproducible tarball)
#     and runtime-packages.txt (ldd of every ELF, each library mapped to its package).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TREE=$(dirname "$HERE")
SRC=$(cd "${1:?usage: $0 LIX_SOURCE_DIR [OUT_DIR]}" && pwd)
OUT=${2:-$TREE/../shared/lix}
WORK=${WORK:-/var/tmp/recnix-lix-build}
JOBS=${JOBS:-2}
PY=${PY:-$TREE/.venv/bin/python}
STUBS=$HERE/lix-stubs
CAPNP=1.1.0
CAPNP_SHA256=07167580e563f5e821e3b2af1c238c16ec7181612650c5901330fa9a0da50939
CAPNP_LIB=/usr/local/lib/capnp-cxx20
PYSITE=/usr/local/lib/python3.13/dist-packages
[ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
[ -f "$SRC/meson.build" ] && [ -d "$SRC/lix" ] || { echo "$0: $SRC is no Lix source tree" >&2; exit 1; }
VERSION=$(tr -d ' \n' < "$SRC/version.json" 2>/dev/null | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')
VERSION=${VERSION:-$(grep -m1 -oE "version *: *'[0-9][^']*'" "$SRC/meson.build" | grep -oE "[0-9][^']*")}
[ -n "$VERSION" ] || { echo "$0: cannot tell the Lix version of $SRC" >&2; exit 1; }
mkdir -p "$WORK/cache/base" "$WORK/wheels" "$OUT"
echo "build-lix-tarball: Lix $VERSION from $SRC (work: $WORK, out: $OUT)"

# 1. the build rootfs (its own cache: recnix's trixie test rootfs is never touched)
py() { "$PY" -c "import sys; sys.path[:0] = ['$TREE/vm', '$TREE']
from pathlib import Path
from recnix_vm import image, rootfs
$1"; }
KEY=$(py "print(image.base_key(image.get_suite('trixie')))")
SHARED_BASE=/var/cache/recnix-vm/base/$KEY.tar
if [ ! -e "$WORK/cache/base/$KEY.tar" ] && [ -e "$SHARED_BASE" ]; then
  ln "$SHARED_BASE" "$WORK/cache/base/" 2>/dev/null || cp "$SHARED_BASE" "$WORK/cache/base/"
fi
ROOT=$(py "print(rootfs.prepare('trixie', Path('$WORK/cache')))" | tail -1)
inside() {  # run "$@" as root inside the build rootfs (own mount namespace, pivot_root)
  "$PY" - "$ROOT" "$@" <<PYEOF
import subprocess, sys
sys.path[:0] = ['$TREE/vm', '$TREE']
from pathlib import Path
from recnix_vm import rootfs
env = {"DEBIAN_FRONTEND": "noninteractive", "PKG_CONFIG_PATH": "/usr/local/lib/pkgconfig",
       "PATH": rootfs.SYSTEM_PATH}  # trixie's python3 (not recnix's venv) for Lix's generators
sys.exit(subprocess.call(rootfs.command(Path(sys.argv[1]), sys.argv[2:], env=env, cwd="/")))
PYEOF
}
DEPS="clang lld meson ninja-build pkgconf cmake rustc cbindgen jq lsof bsdextrautils git python3 python3-yaml
  libboost-dev libboost-context-dev libboost-container-dev libcapnp-dev capnproto libseccomp-dev libgc-dev
  libarchive-dev libbrotli-dev libssl-dev libncurses-dev libsqlite3-dev libcurl4-openssl-dev libtoml11-dev
  tao-pegtl-dev nlohmann-json3-dev libsodium-dev busybox-static dpkg-dev binutils"
if [ ! -e "$ROOT/.lix-build-deps" ]; then
  echo "deb-src http://deb.debian.org/debian trixie main" > "$ROOT/etc/apt/sources.list.d/lix-build-src.list"
  inside sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends $(echo $DEPS)"
  "$PY" -m pip download -q --no-deps -d "$WORK/wheels" python-frontmatter
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.13 \
    --platform manylinux_2_28_x86_64 -d "$WORK/wheels" pycapnp
  mkdir -p "$ROOT$PYSITE"
  for wheel in "$WORK"/wheels/python_frontmatter-*.whl "$WORK"/wheels/pycapnp-*cp313*.whl; do
    "$PY" -m zipfile -e "$wheel" "$ROOT$PYSITE/"
  done
  touch "$ROOT/.lix-build-deps"
fi

# 2. capnproto, static, C++20 (headers stay libcapnp-dev's: the same release)
if [ ! -e "$ROOT$CAPNP_LIB/libcapnp-rpc.a" ]; then
  inside sh -c "set -e; mkdir -p /build/capnp && cd /build/capnp
    [ -e capnproto_$CAPNP.orig.tar.gz ] || apt-get source -q --download-only capnproto=$CAPNP || true
    echo '$CAPNP_SHA256  capnproto_$CAPNP.orig.tar.gz' | sha256sum -c -
    rm -rf capnproto-c++-$CAPNP && tar -xzf capnproto_$CAPNP.orig.tar.gz && cd capnproto-c++-$CAPNP
    cmake -S . -B out -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
      -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_FLAGS=-O2 -DCMAKE_CXX_STANDARD=20 \
      -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DBUILD_SHARED_LIBS=OFF -DBUILD_TESTING=OFF \
      -DWITH_OPENSSL=OFF -DWITH_ZLIB=OFF
    ninja -C out -j$JOBS kj kj-async capnp capnp-rpc
    mkdir -p $CAPNP_LIB
    cp out/src/kj/libkj.a out/src/kj/libkj-async.a out/src/capnp/libcapnp.a out/src/capnp/libcapnp-rpc.a $CAPNP_LIB/"
fi
PC=$ROOT/usr/local/lib/pkgconfig
mkdir -p "$PC"
pc() {  # pc NAME REQUIRES EXTRA_LIBS: a pkg-config file for one of the static libraries
  printf 'includedir=/usr/include\nName: %s\nDescription: capnproto %s (static, C++20; scripts/build-lix-tarball.sh)\nVersion: %s\nRequires: %s\nLibs: %s/lib%s.a %s\nCflags:\n' \
    "$1" "$CAPNP" "$CAPNP" "$2" "$CAPNP_LIB" "$1" "$3" > "$PC/$1.pc"
}
pc kj "" ""
pc kj-async "kj = $CAPNP" "-pthread"
pc capnp "kj = $CAPNP" "-latomic"
pc capnp-rpc "capnp = $CAPNP, kj-async = $CAPNP" ""

# 3. the stand-ins: editline as a static library; lowdown and lix-doc in the source copy
if [ ! -e "$ROOT/usr/local/lib/libeditline.a" ]; then
  mkdir -p "$ROOT/usr/local/include" "$ROOT/build"
  cp "$STUBS/editline.h" "$ROOT/usr/local/include/editline.h"
  cp "$STUBS/editline.c" "$ROOT/build/editline.c"
  inside sh -c "cd /build && clang -O2 -fPIC -I/usr/local/include -c editline.c -o editline.o \
    && ar rcs /usr/local/lib/libeditline.a editline.o"
fi
printf 'Name: libeditline\nDescription: stand-in (scripts/lix-stubs)\nVersion: 1.17.1\nLibs: -L/usr/local/lib -leditline\nCflags: -I/usr/local/include\n' > "$PC/libeditline.pc"
B=/build/lix-$VERSION
if [ ! -e "$ROOT$B/.stubbed" ]; then
  rm -rf "${ROOT:?}$B" && mkdir -p "$ROOT$B"
  (cd "$SRC" && tar --exclude=./.git -cf - .) | tar -xf - -C "$ROOT$B"
  cp "$STUBS/markdown.cc" "$ROOT$B/lix/libcmd/markdown.cc"
  cp "$STUBS/lix-doc-lib.rs" "$ROOT$B/lix/lix-doc/src/lib.rs"
  cp "$STUBS/lix-doc-meson.build" "$ROOT$B/lix/lix-doc/meson.build"
  "$PY" - "$ROOT$B" <<'PYEOF'
import re, sys
from pathlib import Path
src = Path(sys.argv[1])
top = src / "meson.build"
text, n = re.subn(r"^lowdown = dependency\('lowdown'.*$",
                  "lowdown = declare_dependency(version : '0.0.0')  # stand-in: no lowdown",
                  top.read_text(), count=1, flags=re.M)
if n != 1:
    sys.exit("build-lix-tarball: no lowdown dependency line in meson.build")
top.write_text(text)
mono = src / "lix/rust-monocrate/meson.build"
lines = [l for l in mono.read_text().splitlines() if l.strip() not in ("rnix,", "rowan,")]
mono.write_text("\n".join(lines) + "\n")
PYEOF
  touch "$ROOT$B/.stubbed"
fi

# 4. configure, build, install into a stage directory
inside sh -c "set -e; cd $B
  if [ ! -e build/build.ninja ]; then
    rm -rf build
    CC=clang CXX=clang++ meson setup build --prefix=/usr/local --libdir=lib --sysconfdir=/etc \
      -Dbuildtype=plain -Doptimization=2 -Ddebug=false -Denable-tests=false -Denable-docs=false \
      -Dinternal-api-docs=disabled -Dcpuid=disabled -Ddtrace-probes=disabled \
      -Denable-contrib-plugins=false -Dsandbox-shell=/bin/busybox \
      -Dbuiltin-dep-closure=/lib64,/usr/lib64,/usr/lib/x86_64-linux-gnu -Dwerror=false
  fi"
if [ -n "${SETUP_ONLY:-}" ]; then echo "build-lix-tarball: meson setup done ($ROOT$B/build)"; exit 0; fi
ST=/build/stage-$VERSION
inside sh -c "set -e; cd $B; ninja -C build -j$JOBS; rm -rf $ST; DESTDIR=$ST ninja -C build install > /build/install.log"

# 5. the tarball and runtime-packages.txt
PAYLOAD="usr/local/bin usr/local/lib/liblix.so usr/local/libexec usr/local/share/flake-registry.json"
inside sh -c "cd $ST && for f in \$(find $PAYLOAD -type f); do
    case \$(head -c4 \$f | od -An -tx1 | tr -d ' ') in 7f454c46) strip --strip-unneeded \$f;; esac
  done"
EPOCH=$(find "$SRC" -path "$SRC/.git" -prune -o -type f -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1)
TARBALL=$OUT/lix-$VERSION-trixie-x86_64.tar.xz
tar --numeric-owner --owner=0 --group=0 --sort=name --mtime="@$EPOCH" -C "$ROOT$ST" -cf - $PAYLOAD \
  | xz -9 > "$TARBALL.partial"
inside sh -c "cd $ST && for f in \$(find $PAYLOAD -type f); do
    case \$(head -c4 \$f | od -An -tx1 | tr -d ' ') in 7f454c46) LD_LIBRARY_PATH=$ST/usr/local/lib ldd \$f;; esac
  done" > "$WORK/ldd.txt"
if grep 'not found' "$WORK/ldd.txt" >&2; then echo "$0: unresolved libraries" >&2; exit 1; fi
LIBS=$(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' "$WORK/ldd.txt" | grep -v "^$ST" | sort -u)
inside sh -c "for lib in $(echo $LIBS); do
    pkg=''
    for c in \$(readlink -f \$lib) \$lib /usr\$lib; do
      pkg=\$(dpkg -S \$c 2>/dev/null | grep -v '^diversion' | head -1 | cut -d: -f1)
      [ -z \"\$pkg\" ] || break
    done
    echo \${pkg:-UNOWNED:\$lib}
  done" > "$WORK/packages.txt"
if grep UNOWNED "$WORK/packages.txt" >&2; then echo "$0: libraries no package owns" >&2; exit 1; fi
{ cat "$WORK/packages.txt"; echo busybox-static; } | sort -u > "$OUT/runtime-packages.txt"
mv "$TARBALL.partial" "$TARBALL"
echo "build-lix-tarball: $TARBALL ($(du -h "$TARBALL" | cut -f1)), $(wc -l < "$OUT/runtime-packages.txt") runtime packages"
