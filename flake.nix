{
  description = "recnix: recursive Nix as an add-on (restricted per-build Nix daemon sockets)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      eachSystem = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        recnix = final.callPackage ./module/package.nix { };
      };

      # The module takes its package from pkgs.recnix when the overlay is used,
      # else builds module/package.nix with the system's pkgs.
      nixosModules.recnix = ./module;
      nixosModules.default = self.nixosModules.recnix;
      nixosModule = self.nixosModules.recnix;

      packages = eachSystem (pkgs: {
        recnix = pkgs.callPackage ./module/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.recnix;
      });

      checks = eachSystem (
        pkgs:
        {
          # The Python package; its checkPhase runs pytest on tests/unit.
          unit = self.packages.${pkgs.stdenv.hostPlatform.system}.recnix;
        }
        // import ./nixos-tests {
          inherit pkgs;
          recnixModule = self.nixosModules.recnix;
        }
        // {
          # Nix's distributed builds: a client dispatching to a recnix builder.
          remote-builder = import ./nixos-tests/remote-builder.nix {
            inherit pkgs;
            recnixModule = self.nixosModules.recnix;
          };
        }
      );

      devShells = eachSystem (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps: with ps; [
                pytest
                hypothesis
                pexpect
                paramiko
                jinja2
                qemu-qmp
              ]
            ))
            pkgs.ruff
            pkgs.nix
            pkgs.qemu
            pkgs.busybox
          ];
        };
      });

      # nixfmt is the RFC 166 style formatter on nixos-unstable (the former
      # nixfmt-rfc-style).
      formatter = eachSystem (pkgs: pkgs.nixfmt);
    };
}
