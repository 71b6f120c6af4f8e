# The outer build adds a file, then builds inner/wait.nix, which waits up to
# `wait` seconds for `release` in its build directory (it creates `started`
# there first), so a test can collect garbage on the host meanwhile. The
# added file must still exist afterwards.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "", wait ? 0 }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-gc";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    echo "kept alive during the nested build $innerTag" > kept.txt
    a=$(nix-store --add kept.txt)
    p=$(nix-build --no-out-link ${dir}/wait.nix --argstr busybox ${lib.bb} \
          --argstr wait ${toString wait} --argstr tag "$innerTag")
    test -f "$a"
    test -f "$p"
    mkdir "$out"
    ln -s "$a" "$out/added"
    ln -s "$p" "$out/inner"
  '';
}
