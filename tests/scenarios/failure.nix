# The inner build prints RECNIX-INNER-FAILURE-MARKER and fails, so the outer fails.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-failure";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    nix-build --no-out-link ${dir}/fail.nix --argstr busybox ${lib.bb} --argstr tag "$innerTag"
    echo "unreachable: the inner build succeeded" >&2
    mkdir "$out"
  '';
}
