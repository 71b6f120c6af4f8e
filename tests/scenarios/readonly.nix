# Read-only recursive Nix (recnix only; Nix's built-in has no such mode).
# Queries over the build's inputs must work; adding and building must fail.
# Each attempt leaves $out/<check>.rc, <check>.out, <check>.err; the build
# itself succeeds whatever the outcomes.
{ feature ? "recnix-readonly", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-readonly";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    ${lib.checkFunction}
    mkdir "$out"
    echo "readonly $innerTag" > file.txt
    check query-references nix-store -q --references ${lib.nixPackage}
    check query-requisites nix-store -qR ${lib.bb}
    check check-validity nix-store --check-validity ${lib.bb}
    check path-info nix path-info -r ${lib.nixPackage}
    check add nix-store --add file.txt
    check tofile nix-instantiate --eval --read-write-mode \
      -E "builtins.toFile \"recnix-readonly.txt\" \"$innerTag\""
    check build nix-build --no-out-link ${dir}/trivial.nix --argstr busybox ${lib.bb} \
      --argstr name readonly-inner --argstr tag "$innerTag"
  '';
}
