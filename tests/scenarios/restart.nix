# The outer build adds a file and builds once, then creates ./started in its
# build directory and waits (up to `wait` seconds) for ./release there, so a
# test can restart the recnix service meanwhile; then it builds again. $out
# links all three, so its closure must hold them.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "", wait ? 300 }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
in lib.mkBuild {
  name = "scenario-restart";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    echo "added before the restart $innerTag" > before.txt
    a=$(nix-store --add before.txt)
    p1=$(nix-build --no-out-link ${dir}/trivial.nix --argstr busybox ${lib.bb} \
           --argstr name restart-1 --argstr tag "$innerTag")
    touch started
    i=0
    while [ "$i" -lt ${toString (wait * 10)} ] && [ ! -e release ]; do sleep 0.1; i=$((i + 1)); done
    test -f "$a" && test -f "$p1"
    p2=$(nix-build --no-out-link ${dir}/trivial.nix --argstr busybox ${lib.bb} \
           --argstr name restart-2 --argstr tag "$innerTag")
    mkdir "$out"
    ln -s "$a" "$out/added"
    ln -s "$p1" "$out/before"
    ln -s "$p2" "$out/after"
  '';
}
