# A builder goes down in the middle of a build, and the build still
# finishes:
# - a clean shutdown stops the agent with SIGTERM: it drains, so the step
#   it runs finishes and is delivered before the machine is off (one step
#   row, no retry);
# - a crash (power lost) takes the step with it: its lease runs out, and it
#   is retried, here on the same builder once it is back.
# The queue runner uses its embedded database.
{ pkgs, module }:
let
  common = import ./common.nix { inherit pkgs module; };
in
{
  name = "sluice-builder-reboot";

  nodes = {
    runner = common.runner { database = "embedded"; };
    builder = {
      imports = [ common.builder ];
      # The store's writes must survive a reboot like its database does
      # (by default a test VM keeps them in a tmpfs).
      virtualisation.writableStoreUseTmpfs = false;
    };
  };

  testScript = ''
    ${common.helpers { database = "embedded"; }}

    def wait_for_step_running(drv, nonce):
        """Waits until the step's build has started on the builder (its log says so)."""
        runner.wait_until_succeeds(f"grep -q '{nonce}: slow step started' {log_path(drv)}")

    start_all()
    runner.wait_for_unit("sluice-queue-runner.service")
    builder.wait_for_unit("sluice-builder-agent.service")
    wait_for_agents("builder")

    with subtest("a clean shutdown drains the agent: the step finishes first"):
        slow = instantiate("slow", "drain", seconds=20)
        [build] = submit({"slow": slow})
        wait_for_step_running(slow, "drain")
        builder.shutdown()
        assert wait_for_build(build) == 0
        steps = sql(f"select status, machine from BuildSteps where build = {build}")
        assert steps == ["0|builder"], steps
        runner.succeed(f"grep -q 'drain: slow step done' {log_path(slow)}")

    builder.start()
    builder.wait_for_unit("sluice-builder-agent.service")
    wait_for_agents("builder")

    with subtest("a crash loses the step; it is retried and the build finishes"):
        slow = instantiate("slow", "crash", seconds=20)
        [build] = submit({"slow": slow})
        wait_for_step_running(slow, "crash")
        builder.crash()
        builder.start()
        builder.wait_for_unit("sluice-builder-agent.service")
        assert wait_for_build(build) == 0
        steps = sql(f"select status from BuildSteps where build = {build} order by stepnr")
        assert len(steps) >= 2 and steps[-1] == "0", steps
  '';
}
