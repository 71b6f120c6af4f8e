# An inner build that creates ./started in its build directory, then waits
# until ./release appears there or `wait` seconds have passed.
{ busybox, tag ? "", wait ? "0" }:
let lib = import ./lib.nix { inherit busybox; };
in lib.mkBuild {
  name = "waiting-inner";
  env = { inherit tag wait; };
  script = ''
    touch started
    i=0
    while [ "$i" -lt "$wait" ] && [ ! -e release ]; do sleep 1; i=$((i + 1)); done
    echo "waited $i" > "$out"
  '';
}
