# The outer build runs `n` nested nix-build calls of distinct trivial inner
# derivations (many-1 ... many-n) and links each output as $out/inner-<i>.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "", n ? 20 }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-many";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    mkdir "$out"
    i=1
    while [ "$i" -le ${toString n} ]; do
      p=$(nix-build --no-out-link ${dir}/trivial.nix --argstr busybox ${lib.bb} \
            --argstr name "many-$i" --argstr tag "$innerTag")
      ln -s "$p" "$out/inner-$i"
      i=$((i + 1))
    done
  '';
}
