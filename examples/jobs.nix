# Example jobs for `scripts/run-example.sh`: a small DAG with a diamond,
# built with /bin/sh only (nothing from nixpkgs). `nonce` makes the paths
# new on every run, so the example always really builds.
{ nonce ? "example" }:
let
  mk = name: deps: script: derivation {
    name = "${name}-${nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
    inherit deps;
  };
  base = mk "base" [ ] ''
    echo "building base"
    echo base > $out
  '';
  left = mk "left" [ base ] ''
    echo "building left from $deps"
    read x < $deps; echo "left($x)" > $out
  '';
  right = mk "right" [ base ] ''
    echo "building right from $deps"
    read x < $deps; echo "right($x)" > $out
  '';
in
{
  inherit base left right;
  # Depends on both sides of the diamond; declares a product, a metric
  # and a release name the way Hydra jobs do.
  top = derivation {
    name = "top-${nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      set -e
      echo "building top"
      mkdir -p $out/nix-support
      cat ${left} ${right} > $out/result.txt
      echo "file report $out/result.txt" > $out/nix-support/hydra-build-products
      echo "lines 2 count" > $out/nix-support/hydra-metrics
      echo "top-1.0" > $out/nix-support/hydra-release-name
    '' ];
  };
}
