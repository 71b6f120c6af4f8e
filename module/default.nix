# NixOS module for recnix: recursive Nix as an add-on.
#
#   imports = [ recnix.nixosModules.default ];
#   services.recnix.enable = true;
#
# Builds opt in with `requiredSystemFeatures = [ "recnix" ]` (or
# "recnix-readonly"). Every setting's option below (type, default, description)
# comes from ../recnix/config/config-keys.toml, where the daemon reads them too.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.recnix;
  # Every recnix setting, declared once (type, default, doc): ../recnix/config/config-keys.toml,
  # the file the daemon itself reads.
  keys = builtins.fromTOML (builtins.readFile ../recnix/config/config-keys.toml);
  defaults = builtins.mapAttrs (section: builtins.mapAttrs (name: spec: spec.default)) keys;
  unit = builtins.fromTOML (builtins.readFile ../recnix/cli/unit.toml);
  format = pkgs.formats.toml { };

  configPath = "/etc/recnix/config.toml";
  configFile = format.generate "recnix.toml" cfg.settings;

  preBuildHook = lib.getExe' cfg.package "recnix-pre-build-hook";
  postBuildHook = lib.getExe' cfg.package "recnix-post-build-hook";
  # Nix's own build hook (build-remote) with recnix's ssh proxy for ssh-ng://
  # builders (recnix/remote/sshproxy.py); anything else goes to ssh unchanged.
  buildHook = lib.getExe' cfg.package "recnix-build-hook";
  # Nix 2.25-2.33 read nix.conf, then reset build-hook to their own hook
  # (src/nix/main.cc; recnix.cli.nixversion): there it goes on nix-daemon's command line.
  nixVersion = config.nix.package.version or "";
  packageIsLix = lib.getName config.nix.package == "lix";
  buildHookOnCommandLine =
    !cfg.lix
    && nixVersion != ""
    && builtins.compareVersions nixVersion "2.25" >= 0
    && builtins.compareVersions nixVersion "2.34" < 0;

  # nix-required-mounts also wants nix.conf's single `pre-build-hook`. recnix's
  # hook runs the hooks in `preBuildHooks` and passes their output through, so
  # the two compose: recnix takes the setting and chains nix-required-mounts.
  nrmEnabled = config.programs.nix-required-mounts.enable or false;
  nrmHook = lib.getExe config.programs.nix-required-mounts.package;

  # Lix (2.93+) has no built-in recursive-nix: it warns about the unknown
  # experimental feature on every command, and a build asking for the system
  # feature would start without any socket. Left out of nix.settings on Lix.
  featureSettings = [
    "experimental-features"
    "extra-experimental-features"
    "extra-system-features"
  ];
  withoutBuiltin =
    settings:
    let
      stripped = builtins.mapAttrs (
        key: value:
        if builtins.elem key featureSettings && builtins.isList value then
          builtins.filter (f: f != "recursive-nix") value
        else
          value
      ) settings;
    in
    builtins.removeAttrs stripped (
      builtins.filter (key: stripped.${key} == [ ]) (builtins.attrNames stripped)
    );
  nixSettings = if cfg.lix then withoutBuiltin defaults.nix else defaults.nix;

  # The option type of a key's declared type (recnix/config/loader.py validates the same).
  nixType =
    spec:
    if spec.type == "enum" then
      lib.types.enum spec.choices
    else
      {
        str = lib.types.str;
        path = lib.types.str;
        upstream = lib.types.str;
        bool = lib.types.bool;
        positive = lib.types.ints.positive;
        unsigned = lib.types.ints.unsigned;
        str-list = lib.types.listOf lib.types.str;
        host-list = lib.types.listOf lib.types.str;
      }
      .${spec.type};
  # services.recnix.settings.<section>.<key> for every key but those declared
  # `nixos = false` ([hooks]: preBuildHooks/postBuildHooks; [nix]: nix.settings below).
  nixosKeys = builtins.mapAttrs (
    section: specs:
    builtins.removeAttrs specs (
      builtins.filter (name: !(specs.${name}.nixos or true)) (builtins.attrNames specs)
    )
  ) keys;
  settingOptions = builtins.mapAttrs (
    section: builtins.mapAttrs (
      name: spec:
      lib.mkOption {
        type = nixType spec;
        inherit (spec) default;
        description = spec.doc;
      }
    )
  ) (builtins.removeAttrs nixosKeys (builtins.filter (s: nixosKeys.${s} == { }) (builtins.attrNames nixosKeys)));
in
{
  options.services.recnix = {
    enable = lib.mkEnableOption "recnix, which gives Nix builds that require the system feature `recnix` (or `recnix-readonly`) their own restricted Nix daemon socket";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.recnix or (pkgs.callPackage ./package.nix { });
      defaultText = lib.literalExpression "pkgs.callPackage ./module/package.nix { }";
      description = "The recnix package (daemon and the pre-/post-build hooks).";
    };

    lix = lib.mkOption {
      type = lib.types.bool;
      default = packageIsLix;
      defaultText = lib.literalExpression ''lib.getName config.nix.package == "lix"'';
      description = "Whether the system's Nix is Lix, which has no built-in recursive-nix: `experimental-features = recursive-nix` and the `recursive-nix` system feature are then left out of nix.settings. recnix itself works the same on Lix (it does not need the pre-build hook's output, which Lix 2.93-2.95 drops). recnix's build-hook is left out too (Lix >= 2.94 speaks Cap'n Proto to its build hook); false with a Lix nix.package fails evaluation.";
    };

    preBuildHooks = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = lib.optional nrmEnabled nrmHook;
      defaultText = lib.literalExpression ''lib.optional config.programs.nix-required-mounts.enable (lib.getExe config.programs.nix-required-mounts.package)'';
      description = "Further pre-build hooks. recnix owns nix.conf's `pre-build-hook`; it runs these after its own logic (same arguments) and passes their `extra-sandbox-paths` blocks through to Nix.";
    };

    postBuildHooks = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = lib.literalExpression ''[ "''${pkgs.writeShellScript "upload" "..."}" ]'';
      description = "Further post-build hooks (e.g. a binary-cache upload). recnix owns nix.conf's `post-build-hook` and runs these after it has registered the references of recursive outputs.";
    };

    settings = lib.mkOption {
      default = { };
      description = "recnix configuration, written to /etc/recnix/config.toml (the layout of recnix/config/defaults.toml). Keys not listed here are passed through; the daemon rejects unknown ones.";
      type = lib.types.submodule {
        freeformType = format.type;
        options = settingOptions;
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = nrmEnabled -> lib.elem nrmHook cfg.preBuildHooks;
        message = "programs.nix-required-mounts is enabled but its hook is not in services.recnix.preBuildHooks: recnix takes nix.settings.pre-build-hook, so nix-required-mounts would silently stop working.";
      }
      {
        # recnix's build-hook cannot serve Lix (>= 2.94: Cap'n Proto); on a Lix daemon
        # it would fail every build (recnix < issue 20: hang every build for ever).
        assertion = packageIsLix -> cfg.lix;
        message = "services.recnix.lix = false, but nix.package is Lix (${config.nix.package.name or "lix"}): recnix would set nix.conf's build-hook, which Lix cannot use (every build would fail). Remove the services.recnix.lix setting (it defaults to true on Lix) or set it to true.";
      }
      {
        assertion = cfg.settings.daemon.upstream != "stdio";
        message = ''services.recnix.settings.daemon.upstream = "stdio" is for hosts without a nix-daemon; on NixOS use "daemon".'';
      }
    ];

    services.recnix.settings.hooks = {
      pre-build = cfg.preBuildHooks;
      post-build = cfg.postBuildHooks;
    };

    environment.etc."recnix/config.toml".source = configFile;

    # Every [nix] key of config-keys.toml (extra-system-features,
    # experimental-features, sandbox, sandbox-fallback; without Nix's built-in
    # recursive-nix on Lix), plus the hooks (build-hook: for builds this machine
    # dispatches to ssh-ng:// builders, see the README's "Distributed builds").
    nix.settings = lib.mkMerge [
      nixSettings
      {
        # mkForce only over nix-required-mounts' own definition, which recnix
        # chains (see the assertion); any other module setting the hook still
        # conflicts loudly instead of being silently dropped.
        pre-build-hook = if nrmEnabled then lib.mkForce preBuildHook else preBuildHook;
        post-build-hook = postBuildHook;
        # Lix >= 2.94's build hook protocol is Cap'n Proto: Lix keeps its own.
        build-hook = lib.mkIf (!cfg.lix) buildHook;
      }
    ];

    # The hooks run inside nix-daemon; /etc/recnix/config.toml is their default
    # too, set explicitly so that `systemctl show nix-daemon` tells.
    systemd.services.nix-daemon = lib.mkMerge [
      {
        environment = {
          RECNIX_CONFIG = configPath;
        }
        # The config's decision for the hook script (recnix.config.loader.hook_environment):
        # with no chained hooks, builds that do not opt in never read the config.
        // lib.optionalAttrs (cfg.preBuildHooks == [ ] && cfg.postBuildHooks == [ ]) {
          RECNIX_HOOK_SOCKET = cfg.settings.daemon.control-socket;
          RECNIX_HOOK_MARKS = "${cfg.settings.daemon.state-dir}/hook-marks";
          RECNIX_HOOK_CHANNEL = "${cfg.settings.daemon.state-dir}/hook-channel";
        };
      }
      (lib.mkIf buildHookOnCommandLine {
        serviceConfig.ExecStart = [
          ""
          "${config.nix.package}/bin/nix-daemon --daemon --option build-hook ${buildHook}"
        ];
      })
    ];

    systemd.services.recnix = {
      description = "recnix: restricted Nix daemon sockets for recursive builds";
      wantedBy = [ "multi-user.target" ];
      wants = [ "nix-daemon.socket" ];
      after = [
        "nix-daemon.socket"
        "nix-daemon.service"
      ];
      restartTriggers = [ configFile ];
      environment.RECNIX_CONFIG = configPath;
      # nix-store (--register-validity) for the post-build registration.
      path = [ config.nix.package ];
      serviceConfig = unit.Service // {
        ExecStart = "${lib.getExe cfg.package} daemon --config ${configPath}";
        Restart = "on-failure";
        # /run/recnix: control socket and session sockets (defaults.toml [daemon]).
        RuntimeDirectory = "recnix";
        # /var/log/recnix: the audit log.
        LogsDirectory = "recnix";
      };
    };
  };
}
