# An inner build that prints a marker line and fails.
{ busybox, tag ? "" }:
let lib = import ./lib.nix { inherit busybox; };
in lib.mkBuild {
  name = "failing-inner";
  env = { inherit tag; };
  script = ''
    echo "RECNIX-INNER-FAILURE-MARKER tag=$tag"
    exit 1
  '';
}
