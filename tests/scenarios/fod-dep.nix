# The outer build builds inner/uses-fod.nix, whose closure holds the fixed-output
# inner/fod.nix: the nixpkgs-inside shape. With that output already valid on the
# host nothing fixed-output runs (policy.existing-fixed-outputs decides).
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-fod-dep";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    p=$(nix-build --no-out-link ${dir}/uses-fod.nix --argstr busybox ${lib.bb} --argstr tag "$innerTag")
    mkdir "$out"
    ln -s "$p" "$out/uses-fod"
    cat "$p" > "$out/content"
  '';
}
