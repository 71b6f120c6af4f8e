# Evaluate module/default.nix without a NixOS checkout: the options of NixOS
# that the module writes to (nix.settings, systemd.services, environment.etc,
# assertions, programs.nix-required-mounts) are declared here with the types
# NixOS gives them, and `pkgs` is a stub (formats.toml renders TOML text in
# Nix; packages are fake store paths: nothing is built).
#
#   nix-instantiate --eval --strict --json module/eval/eval.nix -A nixConf
#   ... --arg modules '[ { services.recnix.policy... } ]'
#   ... --arg lib 'import /path/to/nixpkgs/lib'   (the real lib; default: ./lib.nix)
{
  lib ? import ./lib.nix,
  modules ? [ ],
  enable ? true,
}:

let
  inherit (lib) types mkOption;

  fakePackage = name: mainProgram: {
    type = "derivation";
    inherit name;
    pname = name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = mainProgram;
  };

  # TOML text for the subset recnix's config uses: tables of scalars, lists
  # and nested tables.
  toTOML =
    let
      scalar =
        v:
        if builtins.isBool v then
          (if v then "true" else "false")
        else if builtins.isInt v || builtins.isFloat v then
          toString v
        else if builtins.isList v then
          "[" + builtins.concatStringsSep ", " (map scalar v) + "]"
        else
          builtins.toJSON (toString v);
      isTable = v: builtins.isAttrs v && !(v ? outPath);
      table =
        prefix: attrs:
        let
          names = builtins.attrNames attrs;
          plain = builtins.filter (n: !(isTable attrs.${n})) names;
          tables = builtins.filter (n: isTable attrs.${n}) names;
          key = n: builtins.toJSON n;
          header = if prefix == [ ] then "" else "[${builtins.concatStringsSep "." (map key prefix)}]\n";
        in
        header
        + builtins.concatStringsSep "" (map (n: "${key n} = ${scalar attrs.${n}}\n") plain)
        + builtins.concatStringsSep "" (map (n: "\n" + table (prefix ++ [ n ]) attrs.${n}) tables);
    in
    table [ ];

  pkgs = {
    recnix = fakePackage "recnix" "recnix";
    nix-required-mounts = fakePackage "nix-required-mounts" "nix-required-mounts";
    formats.toml =
      { }:
      {
        type = types.attrsOf (
          let
            valueType =
              types.oneOf [
                types.bool
                types.int
                types.float
                types.str
                types.path
                (types.attrsOf valueType)
                (types.listOf valueType)
              ]
              // {
                description = "TOML value";
              };
          in
          valueType
        );
        generate = name: value: {
          inherit name;
          outPath = "/nix/store/00000000000000000000000000000000-${name}";
          text = toTOML value;
        };
      };
  };

  # The NixOS options the module defines values for, typed as NixOS types them.
  nixosStub =
    { config, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.anything;
          default = [ ];
        };
        nix.package = mkOption {
          type = types.package;
          default = fakePackage "nix" "nix";
        };
        # NixOS: submodule { freeformType = attrsOf (either confAtom (listOf confAtom)); }
        # lists concatenate, scalars must agree.
        nix.settings = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        systemd.services = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        environment.etc = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        programs.nix-required-mounts = {
          enable = lib.mkEnableOption "nix-required-mounts (stub)";
          package = mkOption {
            type = types.package;
            default = pkgs.nix-required-mounts;
          };
        };
      };
      # What nixpkgs' nix-required-mounts module sets (a plain definition).
      config = lib.mkIf config.programs.nix-required-mounts.enable {
        nix.settings.pre-build-hook = lib.getExe config.programs.nix-required-mounts.package;
      };
    };

  evaluated = lib.evalModules {
    specialArgs = { inherit pkgs; };
    modules = [
      ../default.nix
      nixosStub
      { services.recnix.enable = enable; }
    ]
    ++ modules;
  };
  inherit (evaluated) config options;

  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  checked =
    if failedAssertions == [ ] then
      config
    else
      throw "Failed assertions:\n- ${builtins.concatStringsSep "\n- " failedAssertions}";

  # nix.conf as NixOS renders nix.settings (nixos/modules/config/nix.nix:
  # lists space-separated, bools true/false, paths and packages as strings).
  confValue =
    v:
    if builtins.isBool v then
      (if v then "true" else "false")
    else if builtins.isList v then
      builtins.concatStringsSep " " (map confValue v)
    else
      toString v;
  nixConfSettings = builtins.mapAttrs (_: confValue) checked.nix.settings;

  # Options under services.recnix, flattened like nixpkgs' optionAttrSetToDocList
  # (submodule options included), for the README table.
  docList =
    let
      walk =
        node:
        if lib.isOption node then
          [ node ] ++ (if node.type ? getSubOptions then walk (node.type.getSubOptions node.loc) else [ ])
        else if builtins.isAttrs node then
          builtins.concatLists (map (n: walk node.${n}) (builtins.attrNames (removeAttrs node [ "_module" ])))
        else
          [ ];
      render =
        o:
        {
          name = builtins.concatStringsSep "." o.loc;
          type = o.type.description;
          description = o.description or "";
        }
        // (
          if o ? defaultText then
            { defaultText = o.defaultText.text or o.defaultText; }
          else if o ? default then
            { default = o.default; }
          else
            { }
        );
    in
    map render (walk options.services.recnix);
in
{
  inherit config options docList;
  nixSettings = nixConfSettings;
  nixConf = builtins.concatStringsSep "" (
    map (n: "${n} = ${nixConfSettings.${n}}\n") (builtins.attrNames nixConfSettings)
  );
  configToml = checked.environment.etc."recnix/config.toml".source.text;
  recnixService = checked.systemd.services.recnix;
  nixDaemonEnvironment = checked.systemd.services.nix-daemon.environment;
  nixDaemonExecStart = checked.systemd.services.nix-daemon.serviceConfig.ExecStart or null;
  package = "${checked.services.recnix.package}";
}
