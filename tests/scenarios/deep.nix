# Three levels: the outer build runs nix-build on inner/middle.nix (which
# requires the same feature) and that runs nix-build on inner/trivial.nix.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-deep";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    m=$(nix-build --no-out-link ${dir}/middle.nix --argstr busybox ${lib.bb} \
          --argstr nix ${lib.nixPackage} --argstr feature ${feature} \
          --argstr innerDir ${dir} --argstr tag "$innerTag")
    mkdir "$out"
    ln -s "$m" "$out/middle"
    ln -s "$(cat "$m/inner-path")" "$out/inner"
  '';
}
