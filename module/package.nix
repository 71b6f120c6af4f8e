# recnix as a Nix package, built from the repository's pyproject.toml.
# The daemon and the hooks use the Python standard library only; the test
# tools are check inputs. `doCheck` runs the pure unit tier (tests/unit).
{
  lib,
  python3Packages,
  doCheck ? true,
}:

let
  root = ../.;
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../bin
      ../recnix
      ../vm
      ../tests
      (lib.fileset.maybeMissing ../README.md)
      (lib.fileset.maybeMissing ../LICENSE)
    ];
  };
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  inherit (pyproject.project) version;
  inherit src doCheck;
  pyproject = true;

  build-system = [ python3Packages.setuptools ];
  # Runtime: standard library only (pyproject.toml `dependencies = []`).
  dependencies = [ ];

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    hypothesis
    pexpect
    paramiko
    jinja2
    qemu-qmp
  ];
  # The pure tier only: `host` needs root and a nix-daemon, `vm` needs QEMU;
  # both are run by the NixOS tests (nixos-tests/) instead.
  enabledTestPaths = [ "tests/unit" ];
  pytestFlags = [
    "-m"
    "not host and not vm"
  ];

  # The VM harness (recnix-vm) drives Debian guests from a development
  # checkout; it is not part of what a NixOS host runs.
  # The hooks' sh fast path uses shell builtins only (no grep on PATH needed).
  postInstall = ''
    rm -f $out/bin/recnix-vm
  '';

  pythonImportsCheck = [
    "recnix"
    "recnix.hooks"
  ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.lgpl21Plus;
    mainProgram = "recnix";
    platforms = lib.platforms.linux;
  };
}
