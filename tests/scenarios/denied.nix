# Operations on `secret` (a valid host store path that is NOT an input of
# this build) and store-wide operations, all of which must be refused. Each
# attempt leaves $out/<check>.rc, <check>.out, <check>.err; the build itself
# succeeds. `secret` is a plain string on purpose: no context, not an input.
{ feature ? "recnix", busybox, nix, system ? builtins.currentSystem, tag ? "", innerTag ? "", secret }:
let
  lib = import ./inner/lib.nix { inherit busybox nix system; };
  dir = ./inner;
  secretString = builtins.unsafeDiscardStringContext secret;
in lib.mkBuild {
  name = "scenario-denied";
  features = [ feature ];
  env = { inherit tag innerTag; secret = secretString; };
  script = ''
    ${lib.checkFunction}
    mkdir "$out"
    check exists test -e "$secret"
    check query-references nix-store -q --references "$secret"
    check query-hash nix-store -q --hash "$secret"
    check check-validity nix-store --check-validity "$secret"
    check path-info nix path-info "$secret"
    check realise nix-store --realise "$secret"
    check dump nix-store --dump "$secret"
    check build nix-build --no-out-link ${dir}/uses-path.nix --argstr busybox ${lib.bb} \
      --argstr path "$secret" --argstr tag "$innerTag"
    check add-root nix-store --realise ${lib.bb} --add-root "$TMPDIR/root" --indirect
    check add-root-secret nix-store --realise "$secret" --add-root "$TMPDIR/root2" --indirect
    check gc nix-store --gc --print-dead
    check delete nix-store --delete "$secret"
    check repair-path nix-store --repair-path ${lib.bb}
    check verify-repair nix-store --verify --repair
    check build-repair nix-build --repair --no-out-link ${dir}/trivial.nix \
      --argstr busybox ${lib.bb} --argstr name denied-repair --argstr tag "$innerTag"
  '';
}
