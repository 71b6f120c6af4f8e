# The outer build builds inner/trivial.nix and links the result into $out under
# one output constraint (`check`) that the link violates. Nix cannot see the
# violation (it does not know the inner path when it scans $out); recnix's
# finalisation must, and then no valid $out may be left. With `wait`, the builder
# then creates ./started in its build directory and waits (up to `wait` s) for
# ./release there: it calls Nix no more, so a test may stop recnix meanwhile.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? ""
, check ? "allowedReferences", disallowed ? "", wait ? 0 }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
  # 8000 bytes: the inner result alone is over maxClosureSize below
  big = builtins.concatStringsSep "" (builtins.genList (_: "0123456789") 800);
  constraints = {
    none = { };
    allowedReferences = { allowedReferences = [ ]; };
    disallowedReferences = { disallowedReferences = [ disallowed ]; };
    allowedRequisites = { allowedRequisites = [ ]; };
    maxClosureSize = { maxClosureSize = 4096; innerContent = big; };
  };
in lib.mkBuild {
  name = "scenario-constrained";
  features = [ feature ];
  env = { inherit tag innerTag; innerContent = "hello from the inner build"; }
    // constraints.${check};
  script = ''
    p=$(nix-build --no-out-link ${dir}/trivial.nix --argstr busybox ${lib.bb} \
          --argstr name constrained-inner --argstr tag "$innerTag" \
          --argstr content "$innerContent")
    mkdir "$out"
    ln -s "$p" "$out/inner"
    touch started
    i=0
    while [ "$i" -lt ${toString (wait * 10)} ] && [ ! -e release ]; do sleep 0.1; i=$((i + 1)); done
  '';
}
