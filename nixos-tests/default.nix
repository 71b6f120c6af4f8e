# NixOS VM tests (`nix flake check`): a NixOS guest with services.recnix
# builds the SAME scenario files as the host and VM tiers
# (tests/scenarios/*.nix), offline, with pkgs.busybox and pkgs.nix inside the
# builds. The scenarios are driven by tests/scenarios/runner.py, the runner the
# pytest tiers use, here with the NixOS test driver's `machine.execute`.
{
  pkgs,
  recnixModule,
}:

let
  inherit (pkgs) lib;

  scenarios = ../tests/scenarios;
  # A valid store path that no scenario has as an input (denied.nix `secret`).
  secret = pkgs.writeText "recnix-secret" "recnix must not reveal this\n";

  # Offline builds inside the guest, as nixpkgs' nix-required-mounts test does.
  baseNode =
    { lib, ... }:
    {
      imports = [ recnixModule ];
      services.recnix.enable = true;
      virtualisation.writableStore = true;
      virtualisation.memorySize = 2048;
      virtualisation.cores = 2;
      nix.settings.substituters = lib.mkForce [ ];
      nix.settings.experimental-features = [ "nix-command" ];
      system.extraDependencies = [
        pkgs.busybox
        pkgs.nix
        secret
        scenarios
      ];
      environment.variables.NIX_PAGER = "cat";
    };

  # Python prelude shared by the test scripts: a ScenarioRunner on `machine`.
  prelude = ''
    import shlex
    import sys

    sys.path.insert(0, "${scenarios}")
    from runner import ScenarioRunner


    def make_exec(m):
        def run(argv, timeout):
            rc, out = m.execute(
                shlex.join(argv) + " 2>/tmp/recnix-test-stderr", timeout=int(timeout)
            )
            _, err = m.execute("cat /tmp/recnix-test-stderr")
            return rc, out, err

        return run


    def runner_for(m):
        return ScenarioRunner(make_exec(m), "${scenarios}", "${pkgs.busybox}", "${pkgs.nix}")


    def expect_ok(outcome, what):
        if not outcome.ok:
            raise Exception(f"{what} failed:\n{outcome.describe()}")
        return outcome.out_path
  '';

  mkTest =
    name: extraNode: script:
    pkgs.testers.runNixOSTest {
      name = "recnix-${name}";
      nodes.machine = {
        imports = [
          baseNode
          extraNode
        ];
      };
      testScript = ''
        ${prelude}
        start_all()
        machine.wait_for_unit("nix-daemon.socket")
        machine.wait_for_unit("recnix.service")
        machine.succeed("test -S /run/recnix/control.sock")
        r = runner_for(machine)
        ${script}
      '';
    };
in
{
  scenarios = mkTest "scenarios" { services.recnix.settings.policy.allow-fixed-output = true; } ''
    with subtest("nix.conf carries recnix's settings"):
        conf = machine.succeed("nix show-config")
        for wanted in ("recnix-pre-build-hook", "recnix-post-build-hook", "recnix-readonly"):
            assert wanted in conf, f"{wanted!r} not in nix show-config"
        machine.succeed("grep -q 'allow-fixed-output = true' /etc/recnix/config.toml")

    with subtest("inner: a nested nix-build"):
        out = expect_ok(r.build("inner", "recnix", "nixos"), "inner")
        inner = r.read(f"{out}/inner-path").strip()
        assert r.read(f"{out}/inner-content") == "hello from the inner build\n"
        assert inner in r.closure(out), "inner output not in the outer closure"
        assert r.verify_path(out)

    with subtest("add: nix-store --add and builtins.toFile"):
        expect_ok(r.build("add", "recnix", "nixos"), "add")

    with subtest("deep: three levels"):
        expect_ok(r.build("deep", "recnix", "nixos"), "deep")

    with subtest("fod: nested fixed-output derivation (allowed by policy)"):
        out = expect_ok(r.build("fod", "recnix", "nixos"), "fod")
        assert r.exists(f"{out}/fod")

    with subtest("failure: an inner failure fails the outer build"):
        outcome = r.build("failure", "recnix", "nixos")
        assert not outcome.ok, "the outer build succeeded"
        assert "RECNIX-INNER-FAILURE-MARKER" in outcome.stderr, outcome.describe()

    with subtest("readonly: queries work, adds and builds do not"):
        out = expect_ok(r.build("readonly", "recnix-readonly", "nixos"), "readonly")
        rcs = r.check_results(out)
        for ok in ("query-references", "query-requisites", "check-validity", "path-info"):
            assert rcs[ok] == 0, f"{ok}: {rcs}"
        for denied in ("add", "tofile", "build"):
            assert rcs[denied] != 0, f"{denied}: {rcs}"

    with subtest("denied: paths outside the closure and store-wide operations"):
        out = expect_ok(
            r.build("denied", "recnix", "nixos", {"secret": "${secret}"}), "denied"
        )
        rcs = r.check_results(out)
        # add-root on one of the build's own inputs is not a leak either way.
        rcs.pop("add-root", None)
        assert rcs, "the denied scenario recorded no checks"
        for check, rc in rcs.items():
            assert rc != 0, f"{check} was allowed: {rcs}"

    with subtest("no session is left behind"):
        machine.succeed("test -z \"$(ls -A /run/recnix | grep -v '^control.sock$')\"")
  '';

  # Nix's built-in recursive-nix is the oracle: same inner outputs, same closures.
  builtin-comparison =
    mkTest "builtin-comparison"
      {
        # NixOS sets system-features explicitly, so Nix no longer adds
        # "recursive-nix" to it by itself.
        nix.settings.extra-system-features = [ "recursive-nix" ];
      }
      ''
        for scenario in ("inner", "add", "deep"):
            with subtest(f"{scenario}: built-in recursive-nix and recnix agree"):
                builtin = expect_ok(r.build(scenario, "recursive-nix", "cmp"), f"{scenario} (built-in)")
                recnix = expect_ok(r.build(scenario, "recnix", "cmp"), f"{scenario} (recnix)")
                assert builtin != recnix
                b = r.closure(builtin) - {builtin}
                c = r.closure(recnix) - {recnix}
                assert b == c, f"closures differ: built-in only {b - c}, recnix only {c - b}"
                listing = "ls -l {} | sed 1d | awk '{{print $9, $11}}'"
                assert machine.succeed(listing.format(builtin)) == machine.succeed(listing.format(recnix))
      '';

  # nix-required-mounts and recnix both need nix.conf's single pre-build-hook:
  # recnix takes it and chains nix-required-mounts' hook.
  nix-required-mounts =
    let
      marker = pkgs.writeText "nrm-marker" "mounted by nix-required-mounts\n";
      needsMount = pkgs.writeText "needs-mount.nix" ''
        { busybox, marker, features }:
        derivation {
          name = "needs-mount";
          system = builtins.currentSystem;
          builder = "''${builtins.storePath busybox}/bin/sh";
          args = [ "-c" "cat ''${marker} > $out; if [ -n \"$wantSocket\" ]; then test -S /nix/var/nix/daemon-socket/socket; fi" ];
          wantSocket = if builtins.elem "recnix" features then "1" else "";
          requiredSystemFeatures = features;
        }
      '';
      build =
        features:
        "nix-build --no-out-link ${needsMount} --argstr busybox ${pkgs.busybox} --argstr marker ${marker} --arg features '${builtins.toJSON features}'";
    in
    mkTest "nix-required-mounts"
      {
        programs.nix-required-mounts.enable = true;
        programs.nix-required-mounts.allowedPatterns.nrm-test.paths = [ marker ];
        nix.settings.extra-system-features = [ "nrm-test" ];
        system.extraDependencies = [
          marker
          needsMount
        ];
      }
      ''
        with subtest("recnix holds pre-build-hook and chains nix-required-mounts"):
            conf = machine.succeed("nix show-config")
            assert "recnix-pre-build-hook" in conf, conf
            machine.succeed("grep -q nix-required-mounts /etc/recnix/config.toml")

        with subtest("a build needing nix-required-mounts' feature gets its mount"):
            out = machine.succeed("${build [ "nrm-test" ]}").strip()
            assert machine.succeed(f"cat {out}") == "mounted by nix-required-mounts\n"

        with subtest("a build needing both gets both"):
            machine.succeed("${build [ "nrm-test" "recnix" ]}")

        with subtest("an opted-in recnix build still works"):
            expect_ok(r.build("inner", "recnix", "nrm"), "inner")

        with subtest("without the feature, the marker is not mounted"):
            machine.fail("${build [ ]}")
      '';
}
