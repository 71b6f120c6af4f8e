# The smuggling routes of issue 10: a derivation text naming a host path that is
# not an input, reaching `nix-store -r` inside. `srcText`/`depText` are files
# holding the texts of derivations named leak-src / leak-dep
# (made on the host, see tests/host/test_smuggling.py) whose inputSrcs name the
# secret / whose inputDrvs name a host .drv reading it. (A store name
# `<name>.drv` must match the derivation's name, or Nix rejects the text.)
# Each route leaves $out/<check>.rc/.out/.err (see inner/lib.nix); the build
# itself succeeds. A leak shows as rc 0 and the secret's content in .out.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? ""
, srcText, depText }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
  # a source (no references) whose store name ends in .drv
  asDrv = f: name: builtins.path { path = /. + f; name = "${name}.drv"; };
  asText = f: builtins.path { path = /. + f; name = "leak-text"; };
in lib.mkBuild {
  name = "scenario-smuggle";
  features = [ feature ];
  env = {
    inherit tag innerTag;
    srcDrv = asDrv srcText "leak-src";
    depDrv = asDrv depText "leak-dep";
    srcTxt = asText srcText;
    depTxt = asText depText;
    printed = builtins.readFile (/. + srcText);  # a plain string: no context
  };
  script = ''
    ${lib.checkFunction}
    mkdir "$out"
    realise_cat() { p=$(nix-store -r "$1") && cat "$p"; }
    add_realise() { d=$(nix-store --add "$1") && realise_cat "$d"; }
    # route 1: the .drv-named source inputs themselves
    check route1-src realise_cat "$srcDrv"
    check route1-drv realise_cat "$depDrv"
    # route 2: the same texts added inside
    mkdir "$TMPDIR/a" "$TMPDIR/b" "$TMPDIR/c"
    cp "$srcTxt" "$TMPDIR/a/leak-src.drv"
    check route2-src add_realise "$TMPDIR/a/leak-src.drv"
    cp "$depTxt" "$TMPDIR/b/leak-dep.drv"
    check route2-drv add_realise "$TMPDIR/b/leak-dep.drv"
    # written by the builder itself, added
    printf '%s' "$printed" > "$TMPDIR/c/leak-src.drv"
    check printed add_realise "$TMPDIR/c/leak-src.drv"
  '';
}
