# Sluice's two binaries, `queue-runner` and `builder-agent`, built once from
# this repository with nixpkgs' Rust toolchain. The flake exposes the build
# as `packages.<system>.queue-runner` and `.builder-agent` (the same build,
# each with its own `meta.mainProgram`); without flakes:
#
#   pkgs.callPackage ./nixos/package.nix { }
{ lib, rustPlatform }:
let
  workspace = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "sluice";
  inherit (workspace.workspace.package) version;

  # Only what cargo reads: editing the Nix files, the docs or the scripts
  # does not rebuild the binaries.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../proto
      ../crates
      ../queue-runner
      ../builder-agent
      # Migrations are compiled in (include_str!), and a unit test reads
      # the example settings file.
      ../sql
      ../examples
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    "sluice-queue-runner"
    "-p"
    "sluice-builder-agent"
  ];
  # No protoc: proto/build.rs compiles the .proto files with protox, in
  # Rust. No system libraries either: sqlx and tonic are built without
  # TLS, and zstd and mimalloc are compiled from their crates' C sources.

  # The tests need what a build sandbox lacks: root, a PostgreSQL server,
  # a Nix daemon, mount and network namespaces. `scripts/test.sh` runs
  # them on a real machine, and the nixos-tests run the binaries in VMs.
  doCheck = false;

  meta = {
    description = "Queue runner for Nix continuous integration, compatible with Hydra";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "queue-runner";
  };
}
