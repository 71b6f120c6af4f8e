# recnix and Nix's distributed builds (`nix flake check`, check
# `remote-builder`): `client` has no recnix and lists `builder` in
# nix.buildMachines with the `recnix` feature (ssh-ng, `nixremote`, a user the
# builder's Nix does not trust); `builder` runs services.recnix. The same
# scenario files as every other tier. See README, 'Distributed builds'.
#
# - Built on the builder's store (`nix build --store ssh-ng://…`, the .drv
#   goes along) and copied back (`nix copy --from`): a session on the
#   builder, the inner outputs in the closure on the client.
# - Through `builders`, untrusted: Nix (>= 2.16) copies the .drv, the build
#   gets its session, but Nix copies back only the outputs: `is not valid`.
# - Through `builders`, trusted (root): Nix sends a BasicDerivation and no
#   .drv; recnix's guard fails the build at its first Nix call, with the cause.
# - The builder dies mid-build: the client fails (SSH keep-alives), no hang.
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
          IdentityFile /root/.ssh/id_builder
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


    def remote_store_exec(uri):
        """nix-build -> nix build on the builder's store, then nix copy --from."""

        def run(argv, timeout):
            if not (argv and argv[0].endswith("nix-build")):
                return make_exec(client)(argv, timeout)
            rest = [a for a in argv[2:] if a != "--no-out-link"]
            build = shlex.join(
                ["nix", "build", "--store", uri, "--eval-store", "auto", "--no-link"]
                + ["--print-out-paths", "-f", argv[1], *rest]
            )
            cmd = f"out=$({build}) && nix copy --no-check-sigs --from {uri} $out && echo $out"
            rc, out = client.execute(cmd + " 2>/tmp/recnix-test-stderr", timeout=int(timeout))
            _, err = client.execute("cat /tmp/recnix-test-stderr")
            return rc, out, err

        return run


    start_all()
    builder.wait_for_unit("recnix.service")
    builder.wait_for_unit("sshd.service")
    client.wait_for_unit("multi-user.target")
    client.succeed(
        "install -d -m 700 /root/.ssh && "
        "install -m 600 ${keys.snakeOilPrivateKey} /root/.ssh/id_builder && "
        "ssh nixremote@builder true"
    )
    uri = "ssh-ng://nixremote@builder"

    with subtest("on the builder's store: a session there, the closure back on the client"):
        r = ScenarioRunner(
            remote_store_exec(uri), "${scenarios}", "${pkgs.busybox}", "${pkgs.nix}"
        )
        for scenario, linked in (("inner", "inner"), ("add", "added"), ("deep", "middle")):
            outcome = r.build(scenario, "recnix", "remote-store")
            assert outcome.ok, f"{scenario}: {outcome.describe()}"
            out = outcome.out_path
            target = r.readlink(f"{out}/{linked}")
            assert target in r.closure(out), f"{target} not in the closure of {out}"
            assert target in r.references(out), f"{out} lost its reference to {target}"
            assert r.verify_path(target)
            builder.succeed(f"nix-store --check-validity {out}")
        tree = builder.succeed(f"recnix tree {out}")
        assert "-scenario-deep.drv [finalised]" in tree, tree

    with subtest("builders, untrusted: built in a session, but Nix copies back only the outputs"):
        outcome = runner().build("inner", "recnix", "remote-builders")
        assert not outcome.ok, outcome.describe()
        assert "-inner' is not valid" in outcome.stderr, outcome.describe()

    with subtest("builders, trusted: no .drv on the builder, the build fails with the cause"):
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
