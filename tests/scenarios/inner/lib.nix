# Helpers shared by the scenarios and their inner expressions. No nixpkgs:
# every build is a plain `derivation` whose builder is busybox's sh.
#
# `busybox` and `nix` are store paths: plain strings (from `--argstr`, or
# inside a build) are turned into inputs with `builtins.storePath`; values
# that already carry context (`pkgs.busybox`, `"${pkgs.nix}"`) are used as
# they are, so pure evaluation (flake checks) works too.
{ busybox, nix ? null, system ? builtins.currentSystem }:
let
  asInput = p: if builtins.isString p && !(builtins.hasContext p) then builtins.storePath p else p;
in
rec {
  bb = asInput busybox;
  nixPackage = if nix == null then null else asInput nix;

  # A build running `script` with `sh -e`; PATH holds busybox's applets and,
  # when given, the nix commands. `env` adds derivation attributes.
  mkBuild = { name, script, features ? [ ], env ? { } }:
    derivation ({
      inherit name system;
      builder = "${bb}/bin/sh";
      args = [ "-e" "-c" ''
        export HOME="$TMPDIR"
        export NIX_CONFIG="experimental-features = nix-command"
        ${script}
      '' ];
      PATH = "${bb}/bin" + (if nixPackage == null then "" else ":${nixPackage}/bin");
      requiredSystemFeatures = features;
    } // env);

  # Shell function for scenarios that record outcomes instead of failing:
  # `check NAME command...` leaves $out/NAME.rc (exit status), NAME.out, NAME.err.
  checkFunction = ''
    check() {
      n="$1"; shift
      if "$@" > "$out/$n.out" 2> "$out/$n.err"; then rc=0; else rc=$?; fi
      echo "$rc" > "$out/$n.rc"
    }
  '';
}
