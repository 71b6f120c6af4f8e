# A trivial inner build: $out is a file holding `content`.
{ busybox, name ? "inner", tag ? "", content ? "hello from the inner build" }:
let lib = import ./lib.nix { inherit busybox; };
in lib.mkBuild {
  inherit name;
  env = { inherit tag content; };
  script = ''echo "$content" > "$out"'';
}
