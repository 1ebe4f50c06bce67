{
  description = "Sluice: a queue runner for Nix continuous integration, compatible with Hydra";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # The systems Sluice is built and tested for (it needs Linux: cgroups,
      # sched_setaffinity, mount namespaces in its tests).
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The module, with the packages defaulting to this flake's build for
      # the machine's platform.
      withPackages =
        { pkgs, ... }:
        let
          built = self.packages.${pkgs.stdenv.hostPlatform.system};
        in
        {
          imports = [ ./nixos/module.nix ];
          services.sluice.queueRunner.package = lib.mkDefault built.queue-runner;
          services.sluice.builderAgent.package = lib.mkDefault built.builder-agent;
        };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          sluice = pkgs.callPackage ./nixos/package.nix { };
          # The same build (meta is not part of the derivation), so that
          # `nix run .#builder-agent` runs the agent.
          withMain = name: sluice.overrideAttrs (old: { meta = old.meta // { mainProgram = name; }; });
        in
        {
          queue-runner = withMain "queue-runner";
          builder-agent = withMain "builder-agent";
          default = sluice;
        }
      );

      nixosModules = {
        default = withPackages;
        sluice = withPackages;
        # The bare module: the packages must be set.
        sluice-without-packages = {
          imports = [ ./nixos/module.nix ];
        };
      };

      # The nixos-tests: VMs (KVM strongly advised). `nix flake check` runs
      # them all, `nix build .#checks.x86_64-linux.<name> -L` one.
      checks = forAllSystems (
        pkgs:
        import ./nixos-tests {
          inherit pkgs;
          module = self.nixosModules.default;
        }
        // {
          inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) default;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.postgresql
            pkgs.nix
            # protoc is deliberately absent: the build must not need it
            # (proto/build.rs compiles with protox).
          ];
          # The embedded database and the tests' throwaway servers find
          # initdb and postgres here.
          SLUICE_PG_BIN = "${pkgs.postgresql}/bin";
        };
      });
    };
}
