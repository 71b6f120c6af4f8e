# A fixed-output inner build (no network needed: it writes known content).
{ busybox, tag ? "" }:
let lib = import ./lib.nix { inherit busybox; };
in lib.mkBuild {
  name = "recnix-fixed-output";
  env = {
    inherit tag;
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    # sha256 of "recnix fixed output\n"
    outputHash = "4520c363b603cc02ed4e2e8774b4be50235e8ef9b4b8a2f9fb4967b552fcb177";
  };
  script = ''echo "recnix fixed output" > "$out"'';
}
