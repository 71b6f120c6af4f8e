# An inner build that takes `path` (a store path string) as an input.
{ busybox, path, tag ? "" }:
let
  lib = import ./lib.nix { inherit busybox; };
  input = builtins.storePath path;
in lib.mkBuild {
  name = "uses-path";
  env = { inherit tag; };
  script = ''ls -la ${input} > "$out"'';
}
