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
    pytest-xdist # pyproject.toml's addopts run the tests on parallel workers
    cryptography # tests/unit/formats/test_signatures.py checks recnix's Ed25519 against it
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

  # The VM harness (vm/, a package of its own) is not part of what a NixOS host
  # runs; the unit tests that use it find it in the source tree (tests/conftest.py).

  pythonImportsCheck = [
    "recnix"
    "recnix.hooks.prepost"
  ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.lgpl21Plus;
    mainProgram = "recnix";
    platforms = lib.platforms.linux;
  };
}
