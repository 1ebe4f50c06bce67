# One machine with PostgreSQL and the queue runner, two builders with
# agents: a small job set is built end to end, over both builders, with
# the units as the module makes them (Type=notify: a unit is active only
# once its binary said READY=1). Then both services stop cleanly.
{ pkgs, module }:
let
  common = import ./common.nix { inherit pkgs module; };
in
{
  name = "sluice-farm";

  nodes = {
    runner = common.runner { database = "local"; };
    builder1 = common.builder;
    builder2 = common.builder;
  };

  testScript = ''
    ${common.helpers { database = "local"; }}

    start_all()
    runner.wait_for_unit("sluice-queue-runner.service")
    runner.succeed("curl -fsS http://127.0.0.1:9198/status | grep -q '\"status\":\"up\"'")

    with subtest("both agents register"):
        builder1.wait_for_unit("sluice-builder-agent.service")
        builder2.wait_for_unit("sluice-builder-agent.service")
        wait_for_agents("builder1", "builder2")

    with subtest("the diamond is built, over both builders"):
        top = instantiate("top", "farm", seconds=5)
        [build] = submit({"top": top}, wait=True)
        assert wait_for_build(build) == 0
        out = runner.succeed(f"nix-store --query --outputs {top}").strip()
        result = runner.succeed(f"cat {out}/result.txt")
        assert result.startswith("left(base) from /nix/store/"), result
        assert "right(base) from /nix/store/" in result, result
        # Four steps; left and right were runnable together, each builder
        # had a free slot, so each built at least one of them.
        used = set(sql(f"select distinct machine from BuildSteps where build = {build} and status = 0"))
        assert used == {"builder1", "builder2"}, used
        # The log streamed from the builder is where Hydra's web UI looks.
        runner.succeed(f"grep -q 'farm: building top' {log_path(top)}")

    with subtest("an agent stops cleanly, draining"):
        builder2.succeed("systemctl stop sluice-builder-agent.service")
        builder2.require_unit_state("sluice-builder-agent.service", "inactive")
        builder2.succeed("journalctl -u sluice-builder-agent.service | grep -q 'drained'")

    with subtest("the queue runner stops cleanly"):
        runner.succeed("systemctl stop sluice-queue-runner.service")
        runner.require_unit_state("sluice-queue-runner.service", "inactive")
        runner.succeed("journalctl -u sluice-queue-runner.service | grep -q 'queue runner stopped'")
  '';
}
