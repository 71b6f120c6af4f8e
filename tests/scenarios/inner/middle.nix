# The middle level of the deep scenario: requires the same feature as the
# outer build and itself runs nix-build on trivial.nix.
{ busybox, nix, feature, innerDir, tag ? "" }:
let
  lib = import ./lib.nix { inherit busybox nix; };
  dir = builtins.storePath innerDir;
in lib.mkBuild {
  name = "deep-middle";
  features = [ feature ];
  env = { inherit tag; };
  script = ''
    p=$(nix-build --no-out-link ${dir}/trivial.nix --argstr busybox ${lib.bb} \
          --argstr name deep-inner --argstr tag "$tag")
    mkdir "$out"
    ln -s "$p" "$out/inner"
    echo "$p" > "$out/inner-path"
  '';
}
