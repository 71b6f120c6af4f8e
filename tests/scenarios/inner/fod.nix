# A fixed-output inner build (no network needed: it writes known content).
{ busybox, tag ? "" }:
let
  lib = import ./lib.nix { inherit busybox; };
  # a new tag gives new content, so the output is not valid yet and must be built
  content = "recnix fixed output${if tag == "" then "" else " " + tag}\n";
in lib.mkBuild {
  name = "recnix-fixed-output";
  env = {
    inherit tag;
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" content;
  };
  script = "printf '%s' '${content}' > $out";
}
