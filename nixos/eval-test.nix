# Evaluates nixos/module.nix with nixpkgs' module system alone (no NixOS,
# no packages), for CI machines that have only nixpkgs' `lib`. The NixOS
# options the module sets are declared here, loosely, and `pkgs` is a stub
# with only what the module uses. Each case returns what the module made
# of a configuration: the units, the rendered settings, users, firewall.
# Failed assertions throw, as they do when NixOS builds a system.
#
#   nix-instantiate --eval --strict --json nixos/eval-test.nix \
#     --argstr nixpkgsLib /path/to/nixpkgs/lib -A realistic
#
# `queue-runner/tests/nixos_module.rs` runs every case and checks the
# result against the binaries' own command-line parsers. `example` is a
# module file for the case of that name (the README's example).
{
  nixpkgsLib,
  example ? null,
}:
let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;

  # A package as the module sees one: a derivation with a store path.
  fakePackage = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  } // extra;

  # What the module uses of nixpkgs. The TOML "file" is named after a hash
  # of the settings it holds, so the test can tell which settings went in.
  pkgs = {
    formats.toml =
      { }:
      {
        type =
          let
            value =
              types.nullOr (
                types.oneOf [
                  types.bool
                  types.int
                  types.float
                  types.str
                  (types.attrsOf value)
                  (types.listOf value)
                ]
              )
              // {
                description = "TOML value";
              };
          in
          types.attrsOf value;
        generate =
          name: value:
          "/nix/store/${builtins.hashString "sha256" (builtins.toJSON value)}-${name}";
      };
    postgresql = fakePackage "postgresql-17" { jitSupport = false; };
    postgresql_jit = fakePackage "postgresql-17-jit" { jitSupport = true; };
  };

  loose = mkOption {
    type = types.attrsOf types.anything;
    default = { };
  };
  list =
    type:
    mkOption {
      type = types.listOf type;
      default = [ ];
    };

  # The NixOS options the module touches, declared as loosely as they can
  # be while still merging like NixOS's.
  nixosStub = {
    options = {
      assertions = list types.anything;
      warnings = list types.str;
      systemd.services = mkOption {
        type = types.attrsOf (
          types.submodule {
            freeformType = types.attrsOf types.anything;
            options = {
              serviceConfig = loose;
              environment = loose;
              path = list types.anything;
              wantedBy = list types.str;
              wants = list types.str;
              after = list types.str;
              requires = list types.str;
            };
          }
        );
        default = { };
      };
      systemd.tmpfiles.rules = list types.str;
      users.users = loose;
      users.groups = loose;
      nix.package = mkOption {
        type = types.package;
        default = fakePackage "nix-2.28" { };
      };
      nix.settings = mkOption {
        type = types.submodule {
          freeformType = types.attrsOf types.anything;
          options.trusted-users = list types.str;
        };
        default = { };
      };
      services.postgresql = loose;
      services.nginx = loose;
      networking.firewall.allowedTCPPorts = list types.port;
      environment.systemPackages = list types.package;
    };
  };

  # The config the module makes of `configuration`, or a throw listing the
  # assertions that failed.
  evaluate =
    configuration:
    let
      evaluated = lib.evalModules {
        modules = [
          nixosStub
          ./module.nix
          configuration
        ];
        specialArgs = { inherit pkgs; };
      };
      inherit (evaluated) config;
      failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    in
    if failed != [ ] then
      throw "Failed assertions:\n${lib.concatMapStringsSep "\n" (m: "- ${m}") failed}"
    else
      config;

  # What a test looks at.
  summary =
    config:
    let
      runner = config.services.sluice.queueRunner;
    in
    {
      queueRunner = lib.optionalAttrs runner.enable {
        unit = config.systemd.services.sluice-queue-runner;
        settings = lib.filterAttrs (_: v: v != null) runner.settings;
        settingsHash = builtins.hashString "sha256" (
          builtins.toJSON (lib.filterAttrs (_: v: v != null) runner.settings)
        );
        inherit (runner) configFile;
      };
      builderAgent = lib.optionalAttrs config.services.sluice.builderAgent.enable {
        unit = config.systemd.services.sluice-builder-agent;
      };
      users = config.users.users;
      groups = builtins.attrNames config.users.groups;
      trustedUsers = config.nix.settings.trusted-users;
      firewallPorts = config.networking.firewall.allowedTCPPorts;
      tmpfiles = config.systemd.tmpfiles.rules;
      postgresql = config.services.postgresql;
    };

  packages = {
    services.sluice.queueRunner.package = fakePackage "sluice-0.1.0" { };
    services.sluice.builderAgent.package = fakePackage "sluice-0.1.0" { };
  };
in
{
  # A deployment as the README shows it: PostgreSQL on the machine, a
  # signed file:// cache outside the data directory, an agent with a slot
  # layout of its own.
  realistic = summary (evaluate {
    imports = [ packages ];
    services.sluice.queueRunner = {
      enable = true;
      agentTokenFile = "/run/secrets/agent-tokens";
      signingKeyFile = "/run/secrets/cache-key";
      environmentFile = "/run/secrets/sluice-env";
      createLocalDatabase = true;
      openFirewall = true;
      logFormat = "json";
      settings = {
        "grpc-listen" = "0.0.0.0:50051";
        "http-listen" = "127.0.0.1:9198";
        "binary-cache" = "file:///srv/binary-cache";
        "binary-cache-compression" = "xz";
        "lease-s" = 45;
        "max-cpu-pressure" = 80;
        "dispatch-order" = "hydra";
        "shutdown-timeout-s" = 50;
        "status-interval-s" = 10;
      };
    };
    services.sluice.builderAgent = {
      enable = true;
      tokenFile = "/run/secrets/agent-token";
      settings = {
        "queue-runner" = "http://runner.example.org:50051";
        name = "builder-7";
        systems = [
          "x86_64-linux"
          "i686-linux"
        ];
        features = [
          "kvm"
          "big-parallel"
        ];
        slots = 4;
        "cpus-per-slot" = 8;
        "max-jobs" = 4;
        prefetch = 2;
        pinning = "on";
        "sysfs-root" = "/sys";
        "speed-factor" = 1.5;
        "drain-timeout-s" = 1800;
      };
    };
    # Settings still merge like NixOS's.
    systemd.services.sluice-queue-runner.environment.RUST_LOG = "info,sluice_queue_runner=debug";
  });

  # Only what is required: the embedded database under /var/lib/sluice,
  # the store through the system's daemon.
  minimal = summary (evaluate {
    imports = [ packages ];
    services.sluice.queueRunner = {
      enable = true;
      agentTokenFile = "/run/secrets/agent-tokens";
    };
    services.sluice.builderAgent = {
      enable = true;
      tokenFile = "/run/secrets/agent-token";
      settings."queue-runner" = "http://127.0.0.1:50051";
    };
  });

  # As root, serving the local store itself; the data directory outside
  # /var/lib.
  root = summary (evaluate {
    imports = [ packages ];
    services.sluice.queueRunner = {
      enable = true;
      user = "root";
      agentTokenFile = "/run/secrets/agent-tokens";
      settings = {
        "store-socket" = null;
        "data-dir" = "/srv/sluice";
      };
    };
  });

  # The configuration of the file given as `example`.
  example = summary (evaluate {
    imports = [
      packages
      example
    ];
  });

  # A JIT-enabled PostgreSQL for the embedded database.
  jit = summary (evaluate {
    imports = [ packages ];
    services.sluice.queueRunner = {
      enable = true;
      agentTokenFile = "/run/secrets/agent-tokens";
      postgresqlPackage = pkgs.postgresql_jit;
    };
  });

  # Configurations the module must refuse, each with the words its error
  # must contain.
  bad = {
    # A string where a number of jobs goes.
    maxJobsType = summary (evaluate {
      imports = [ packages ];
      services.sluice.builderAgent = {
        enable = true;
        tokenFile = "/t";
        settings = {
          "queue-runner" = "http://q:50051";
          "max-jobs" = "four";
        };
      };
    });
    # Not one of the orders.
    dispatchOrder = summary (evaluate {
      imports = [ packages ];
      services.sluice.queueRunner = {
        enable = true;
        agentTokenFile = "/t";
        settings."dispatch-order" = "fastest";
      };
    });
    # Serving the local store needs root.
    storeWithoutRoot = summary (evaluate {
      imports = [ packages ];
      services.sluice.queueRunner = {
        enable = true;
        agentTokenFile = "/t";
        settings."store-socket" = null;
      };
    });
    # A stop timeout that would cut the drain short.
    stopBeforeDrain = summary (evaluate {
      imports = [ packages ];
      services.sluice.builderAgent = {
        enable = true;
        tokenFile = "/t";
        stopTimeout = 60;
        settings."queue-runner" = "http://q:50051";
      };
    });
    # A slot count without its CPUs.
    slotsAlone = summary (evaluate {
      imports = [ packages ];
      services.sluice.builderAgent = {
        enable = true;
        tokenFile = "/t";
        settings = {
          "queue-runner" = "http://q:50051";
          slots = 2;
        };
      };
    });
  };
}
