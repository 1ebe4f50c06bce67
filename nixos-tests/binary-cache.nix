# The queue runner fills a signed file:// binary cache, which nginx serves
# over HTTP; a client machine trusting the cache's key substitutes a
# built output and its closure from it, and refuses it under another key.
# The queue runner uses its embedded database.
{ pkgs, module }:
let
  common = import ./common.nix { inherit pkgs module; };
  cacheDir = "/var/lib/sluice/binary-cache";
  publicKey = pkgs.lib.fileContents ./keys/sluice-test-1.public;
  untrustedKey = pkgs.lib.fileContents ./keys/untrusted.public;
in
{
  name = "sluice-binary-cache";

  nodes = {
    runner = {
      imports = [ (common.runner { database = "embedded"; }) ];
      services.sluice.queueRunner = {
        settings."binary-cache" = "file://${cacheDir}";
        signingKeyFile = ./keys/sluice-test-1.secret;
      };
      services.nginx = {
        enable = true;
        virtualHosts.cache = {
          default = true;
          root = cacheDir;
        };
      };
      # The cache's files are the queue runner's, readable by its group.
      users.users.nginx.extraGroups = [ "sluice" ];
      networking.firewall.allowedTCPPorts = [ 80 ];
    };
    builder = common.builder;
    client = {
      nix.settings = {
        substituters = pkgs.lib.mkForce [ "http://runner" ];
        trusted-public-keys = pkgs.lib.mkForce [ publicKey ];
      };
      environment.systemPackages = [ pkgs.curl ];
    };
  };

  testScript = ''
    ${common.helpers { database = "embedded"; }}

    start_all()
    runner.wait_for_unit("sluice-queue-runner.service")
    runner.wait_for_unit("nginx.service")
    builder.wait_for_unit("sluice-builder-agent.service")
    wait_for_agents("builder")

    top = instantiate("top", "cache")
    [build] = submit({"top": top}, wait=True)
    assert wait_for_build(build) == 0
    out = runner.succeed(f"nix-store --query --outputs {top}").strip()
    closure = runner.succeed(f"nix-store --query --requisites {out}").split()
    assert len(closure) == 4, closure

    with subtest("the finished build's closure is in the cache, signed"):
        runner.succeed("test -f ${cacheDir}/nix-cache-info")
        for path in closure:
            digest = path.removeprefix("/nix/store/")[:32]
            narinfo = client.succeed(f"curl -fsS http://runner/{digest}.narinfo")
            assert f"StorePath: {path}" in narinfo, narinfo
            assert "Sig: sluice-test-1:" in narinfo, narinfo

    with subtest("a client that trusts another key refuses the cache"):
        client.fail(f"nix-store --realise {out} --option trusted-public-keys '${untrustedKey}'")
        client.fail(f"test -e {out}")

    with subtest("a client that trusts the key substitutes the closure"):
        client.succeed(f"nix-store --realise {out}")
        client.succeed(f"nix-store --verify-path {' '.join(closure)}")
        expected = runner.succeed(f"cat {out}/result.txt")
        assert client.succeed(f"cat {out}/result.txt") == expected
  '';
}
