# The nixos-tests, as the flake's `checks`: VMs, so they need a full
# nixpkgs and, in practice, KVM. Each is run with
#   nix build .#checks.x86_64-linux.<name> -L
# and all of them (with the package build) by `nix flake check`.
#
# `module`: the NixOS module with its packages set (the flake's
# `nixosModules.default`).
{ pkgs, module }:
let
  test = file: pkgs.testers.runNixOSTest (import file { inherit pkgs module; });
in
{
  sluice-farm = test ./farm.nix;
  sluice-builder-reboot = test ./builder-reboot.nix;
  sluice-binary-cache = test ./binary-cache.nix;
}
