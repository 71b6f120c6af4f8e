# The outer build writes an inner expression into its build directory, runs
# nix-build on it, and links the inner output into $out.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let lib = import ./inner/lib.nix { inherit busybox nix system; };
in lib.mkBuild {
  name = "scenario-inner";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    cat > generated.nix <<EOF
    let bb = builtins.storePath "${lib.bb}"; in
    derivation {
      name = "inner";
      system = "${system}";
      builder = "\''${bb}/bin/sh";
      tag = "$innerTag";
      args = [ "-c" "echo hello from the inner build > \$out" ];
    }
    EOF
    p=$(nix-build --no-out-link generated.nix)
    mkdir "$out"
    ln -s "$p" "$out/inner"
    echo "$p" > "$out/inner-path"
    cat "$p" > "$out/inner-content"
  '';
}
