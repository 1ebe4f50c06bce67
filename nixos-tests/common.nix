# What the nixos-tests share: the machines' configurations and the Python
# helpers of their test scripts.
#
# The tokens and keys here are for these tests only. They are in the Nix
# store, readable by everyone: a real deployment keeps its own out of it.
{ pkgs, module }:
let
  tokens = pkgs.writeText "sluice-agent-tokens" "nixos-test:sluice-nixos-test-token-0123456789\n";
in
{
  # A queue runner open to the agents, with short leases and retries so a
  # lost builder costs seconds, and busybox (the jobs' only tool) in its
  # store. `database`: "local" for PostgreSQL on the machine
  # (createLocalDatabase), "embedded" for the queue runner's own.
  runner =
    {
      database ? "local",
    }:
    {
      imports = [ module ];
      services.sluice.queueRunner = {
        enable = true;
        agentTokenFile = tokens;
        openFirewall = true;
        createLocalDatabase = database == "local";
        settings = {
          "grpc-listen" = "0.0.0.0:50051";
          "lease-s" = 10;
          "retry-interval-s" = 2;
        };
      };
      virtualisation.additionalPaths = [ pkgs.busybox ];
      virtualisation.memorySize = 2048;
      environment.etc."sluice-test/jobs.nix".source = ./jobs.nix;
      environment.systemPackages = [
        pkgs.curl
        pkgs.postgresql
      ];
    };

  # A builder agent dialing the runner; it drains for up to two minutes.
  builder = {
    imports = [ module ];
    services.sluice.builderAgent = {
      enable = true;
      tokenFile = tokens;
      settings = {
        "queue-runner" = "http://runner:50051";
        "reconnect-max-ms" = 2000;
        "drain-timeout-s" = 120;
      };
    };
    virtualisation.memorySize = 1024;
  };

  # Helpers for the test scripts. `sql` runs a query on the runner's
  # database and returns its rows (fields separated by |).
  helpers =
    {
      database ? "local",
    }:
    let
      psql =
        if database == "local" then
          "runuser -u sluice -- psql -d sluice"
        else
          "psql 'postgres://postgres@localhost/hydra?host=/var/lib/sluice/postgres-socket'";
      submitAs = if database == "local" then "runuser -u sluice -- " else "";
      databaseArg =
        if database == "local" then
          "--database-url 'postgres://sluice@localhost/sluice?host=/run/postgresql'"
        else
          "--data-dir /var/lib/sluice";
    in
    ''
      import json
      import re


      def sql(query):
          out = runner.succeed(f"${psql} -tA -c \"{query}\"")
          return [line for line in out.splitlines() if line]


      def machines():
          status = runner.succeed("curl -fsS http://127.0.0.1:9198/status/machines")
          return list(json.loads(status)["machines"].values())


      def wait_for_agents(*names):
          """Waits until every agent named has registered with the runner."""
          retry(lambda _last: set(names) <= {m["hostname"] for m in machines()})


      def instantiate(attr, nonce, seconds=0):
          return runner.succeed(
              "nix-instantiate /etc/sluice-test/jobs.nix"
              f" -A {attr} --argstr nonce {nonce} --argstr seconds {seconds}"
              " --argstr busybox ${pkgs.busybox}"
          ).strip()


      def submit(jobs, wait=False):
          """Queues one build per job ({name: .drv}); returns their ids in order."""
          args = " ".join(f"--job {name} {drv}" for name, drv in jobs.items())
          out = runner.succeed(
              f"${submitAs}queue-runner submit ${databaseArg} {args}"
              + (" --wait" if wait else "")
          )
          return [int(n) for n in re.findall(r"queued build (\d+)", out)]


      def wait_for_build(build_id):
          """Waits until the build is finished; returns its Hydra status (0: success)."""
          runner.wait_until_succeeds(
              f"test -n \"$(${psql} -tA -c 'select 1 from Builds where id = {build_id} and finished = 1')\""
          )
          return int(sql(f"select buildStatus from Builds where id = {build_id}")[0])


      def log_path(drv):
          base = drv.split("/")[-1]
          return f"/var/lib/sluice/build-logs/{base[:2]}/{base[2:]}"
    '';
}
