# The outer build builds a fixed-output inner derivation (inner/fod.nix).
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-fod";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    p=$(nix-build --no-out-link ${dir}/fod.nix --argstr busybox ${lib.bb} --argstr tag "$innerTag")
    mkdir "$out"
    ln -s "$p" "$out/fod"
    cat "$p" > "$out/fod-content"
  '';
}
