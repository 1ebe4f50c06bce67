# The jobs the nixos-tests build: a diamond (base, left and right on it,
# top on both) and a slow step, with busybox as their only tool. The
# queue runner's machine has busybox in its store; an agent that lacks it
# fetches it from the queue runner like any input.
#
#   nix-instantiate jobs.nix -A top --argstr busybox /nix/store/...-busybox \
#     --argstr nonce run1 [--argstr seconds 20]
#
# `nonce` makes every run's paths new; `seconds` is how long left, right
# and slow sleep.
{
  busybox,
  nonce,
  seconds ? "0",
}:
let
  # Impure (nix-instantiate allows it): a path of the local store, as a
  # dependency of the derivations that use it.
  bb = builtins.storePath busybox;
  job =
    name: deps: script:
    derivation {
      name = "${name}-${nonce}";
      system = builtins.currentSystem;
      builder = "${bb}/bin/sh";
      args = [
        "-c"
        script
      ];
      PATH = "${bb}/bin";
      inherit deps seconds;
    };
  base = job "base" [ ] ''
    echo "${nonce}: building base"
    echo base > $out
  '';
  # Their outputs name their inputs: the closure of top is all four.
  side =
    name:
    job name [ base ] ''
      echo "${nonce}: building ${name}"
      sleep $seconds
      read x < $deps
      echo "${name}($x) from $deps" > $out
    '';
  left = side "left";
  right = side "right";
  top = job "top" [ left right ] ''
    echo "${nonce}: building top"
    mkdir -p $out
    echo $deps > $out/inputs
    cat $deps > $out/result.txt
  '';
  slow = job "slow" [ ] ''
    echo "${nonce}: slow step started"
    sleep $seconds
    echo "${nonce}: slow step done"
    echo slow > $out
  '';
in
{
  inherit
    base
    left
    right
    top
    slow
    ;
}
