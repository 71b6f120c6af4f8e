# A nested build that depends on the fixed-output inner/fod.nix (as a nixpkgs
# package depends on its fetched sources).
{ busybox, tag ? "" }:
let
  lib = import ./lib.nix { inherit busybox; };
  src = import ./fod.nix { inherit busybox tag; };
in lib.mkBuild {
  name = "uses-fixed-output";
  env = { inherit tag; };
  script = ''cat ${src} > "$out"'';
}
