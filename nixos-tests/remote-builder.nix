# recnix behind Nix's distributed builds (`nix flake check`, check
# `remote-builder`): `client` has no recnix and lists `builder` in
# nix.buildMachines with the `recnix` feature; `builder` runs
# services.recnix. The same scenario files as every other tier.
#
# - ssh-ng:// as `nixremote`, a user the builder's Nix does not trust: Nix
#   (>= 2.16) copies the outer .drv and builds it with BuildPaths, so the
#   builder's pre-build hook reads it and opens a session; the result comes
#   back with its inner outputs in its closure.
# - ssh-ng:// as root (trusted): Nix sends only a BasicDerivation
#   (BuildDerivation) and no .drv; recnix cannot tell the build opted in, so
#   the build fails at its first Nix call with recnix's explanation.
# - the builder dies mid-build: the client fails (SSH keep-alives), no hang.
{
  pkgs,
  recnixModule,
}:

let
  scenarios = ../tests/scenarios;
  keys = import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs;
  # Runs until the builder is killed under it.
  slow = pkgs.writeText "slow.nix" ''
    { busybox }:
    derivation {
      name = "remote-slow";
      system = builtins.currentSystem;
      builder = "''${builtins.storePath busybox}/bin/sh";
      args = [ "-c" "sleep 3600" ];
      requiredSystemFeatures = [ "recnix" ];
    }
  '';
  common = {
    virtualisation.writableStore = true;
    virtualisation.memorySize = 2048;
    virtualisation.cores = 2;
    nix.settings.substituters = pkgs.lib.mkForce [ ];
    nix.settings.experimental-features = [ "nix-command" ];
    system.extraDependencies = [
      pkgs.busybox
      pkgs.nix
      scenarios
      slow
    ];
    environment.variables.NIX_PAGER = "cat";
  };
in
pkgs.testers.runNixOSTest {
  name = "recnix-remote-builder";

  nodes.builder =
    { ... }:
    {
      imports = [
        recnixModule
        common
      ];
      services.recnix.enable = true;
      services.openssh.enable = true;
      users.users.root.openssh.authorizedKeys.keys = [ keys.snakeOilPublicKey ];
      users.users.nixremote = {
        isNormalUser = true;
        openssh.authorizedKeys.keys = [ keys.snakeOilPublicKey ];
      };
    };

  nodes.client =
    { ... }:
    {
      imports = [ common ];
      nix.distributedBuilds = true;
      nix.buildMachines = [
        {
          hostName = "builder";
          system = "x86_64-linux";
          protocol = "ssh-ng";
          sshUser = "nixremote";
          sshKey = "/root/.ssh/id_builder";
          maxJobs = 2;
          supportedFeatures = [
            "recnix"
            "recnix-readonly"
          ];
        }
      ];
      # A builder that goes away must fail the build, not hang it.
      programs.ssh.extraConfig = ''
        Host builder
          StrictHostKeyChecking accept-new
          ServerAliveInterval 5
          ServerAliveCountMax 3
      '';
    };

  testScript = ''
    import shlex
    import sys
    import threading

    sys.path.insert(0, "${scenarios}")
    from runner import ScenarioRunner


    def make_exec(m, extra=()):
        def run(argv, timeout):
            if argv and argv[0].endswith("nix-build"):
                argv = [*argv, *extra]
            rc, out = m.execute(
                shlex.join(argv) + " 2>/tmp/recnix-test-stderr", timeout=int(timeout)
            )
            _, err = m.execute("cat /tmp/recnix-test-stderr")
            return rc, out, err

        return run


    def runner(extra=()):
        return ScenarioRunner(
            make_exec(client, extra), "${scenarios}", "${pkgs.busybox}", "${pkgs.nix}"
        )


    start_all()
    builder.wait_for_unit("recnix.service")
    builder.wait_for_unit("sshd.service")
    client.wait_for_unit("multi-user.target")
    client.succeed(
        "install -d -m 700 /root/.ssh && "
        "install -m 600 ${keys.snakeOilPrivateKey} /root/.ssh/id_builder && "
        "ssh -i /root/.ssh/id_builder nixremote@builder true"
    )

    with subtest("untrusted ssh-ng: the outer build runs on the builder in a session"):
        r = runner()
        for scenario, linked in (("inner", "inner"), ("add", "added"), ("deep", "middle")):
            outcome = r.build(scenario, "recnix", "remote")
            assert outcome.ok, f"{scenario}: {outcome.describe()}"
            out = outcome.out_path
            target = r.readlink(f"{out}/{linked}")
            assert target in r.closure(out), f"{target} not in the closure of {out}"
            assert target in r.references(out), f"{out} lost its reference to {target}"
            builder.succeed(f"nix-store --check-validity {out}")
        tree = builder.succeed(f"recnix tree {out}")
        assert "-scenario-deep" in tree, tree

    with subtest("trusted ssh-ng: no .drv on the builder, the build fails with the cause"):
        trusted = "ssh-ng://root@builder x86_64-linux /root/.ssh/id_builder 2 1 recnix"
        outcome = runner(["--builders", trusted]).build("inner", "recnix", "remote-trusted")
        assert not outcome.ok, outcome.describe()
        assert "was sent to this machine without its .drv" in outcome.stderr, outcome.describe()

    with subtest("both stores verify"):
        for m in (client, builder):
            m.succeed("nix-store --verify --check-contents")

    with subtest("the builder dies mid-build: the client fails, nothing hangs"):
        done = {}

        def build():
            done["result"] = client.execute(
                "nix-build --no-out-link ${slow} --argstr busybox ${pkgs.busybox}", timeout=600
            )

        t = threading.Thread(target=build)
        t.start()
        builder.wait_until_succeeds("pgrep -f 'sleep 3600'", timeout=300)
        builder.crash()
        t.join(700)
        assert not t.is_alive(), "nix-build still runs after the builder died"
        assert done["result"][0] != 0, done
        client.succeed("nix-store --verify --check-contents")
  '';
}
