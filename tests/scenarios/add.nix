# The outer build adds a file with `nix-store --add` and another with
# `builtins.toFile` (nix-instantiate --eval --read-write-mode); $out links both.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "" }:
let lib = import ./inner/lib.nix { inherit busybox nix system; };
in lib.mkBuild {
  name = "scenario-add";
  features = [ feature ];
  env = { inherit tag innerTag; };
  script = ''
    echo "added by the add scenario $innerTag" > added.txt
    a=$(nix-store --add added.txt)
    t=$(nix-instantiate --eval --read-write-mode \
          -E "builtins.toFile \"recnix-tofile.txt\" \"made by toFile $innerTag\"" | tr -d '"')
    test -f "$a"
    test -f "$t"
    mkdir "$out"
    ln -s "$a" "$out/added"
    ln -s "$t" "$out/tofile"
    echo "$a" > "$out/added-path"
    echo "$t" > "$out/tofile-path"
  '';
}
