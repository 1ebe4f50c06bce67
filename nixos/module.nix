# The NixOS module of Sluice: `services.sluice.queueRunner` runs
# `queue-runner serve`, `services.sluice.builderAgent` runs a `builder-agent`
# that dials it. A machine may run either or both.
#
# Every setting of `serve` is an option under `queueRunner.settings`, named
# like its key in the TOML file the module renders (and like its flag:
# `grpc-listen` is `--grpc-listen`); every flag of the agent is an option
# under `builderAgent.settings`, named like the flag. A setting left `null`
# takes the binary's own default (`--help` shows each). Secrets (the
# agents' tokens, the cache's signing key) are never copied into the Nix
# store: systemd hands them to the service as credentials.
#
# The packages have no default here (nixpkgs does not carry Sluice); the
# flake's `nixosModules.default` sets them to the flake's build.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionals
    types
    ;

  cfg = config.services.sluice;
  runner = cfg.queueRunner;
  agent = cfg.builderAgent;

  toml = pkgs.formats.toml { };

  # TOML has no null: a setting left null is left out, and the binary
  # uses its default.
  present = lib.filterAttrs (_: value: value != null);

  setting =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };

  # One argument of ExecStart, quoted for systemd: it must stay one word,
  # and `%` (specifiers) and `$` (variables) must stay literal.
  execArg =
    arg:
    let
      escaped =
        lib.replaceStrings
          [
            "\\"
            "\""
            "%"
            "$"
          ]
          [
            "\\\\"
            "\\\""
            "%%"
            "$$"
          ]
          (toString arg);
    in
    "\"${escaped}\"";
  execLine = args: lib.concatStringsSep " " (map execArg args);

  # The port of a listen address such as `0.0.0.0:50051` or `[::]:50051`.
  portOf = address: lib.toInt (lib.last (lib.splitString ":" address));

  # The directory of a `file://` store URI (query parameters dropped), or
  # null for any other URI.
  fileCacheDir =
    uri:
    if uri != null && lib.hasPrefix "file://" uri then
      builtins.head (lib.splitString "?" (lib.removePrefix "file://" uri))
    else
      null;

  # Names of the credentials the queue runner gets, and where it finds them
  # (`%d` is the unit's credentials directory).
  credential = name: "%d/${name}";

  # ---------------------------------------------------------------- queue runner

  runnerSettings = present runner.settings;
  dataDir = runner.settings."data-dir";
  storeSocket = runner.settings."store-socket";
  embeddedDatabase = runner.settings."database-url" == null;
  cacheDir = fileCacheDir runner.settings."binary-cache";
  # The unprivileged, hardened mode: the queue runner reaches the store
  # through the system's nix-daemon.
  runnerUsesDaemon = storeSocket != null;
  stateDirectory =
    if lib.hasPrefix "/var/lib/" dataDir then lib.removePrefix "/var/lib/" dataDir else null;
  # Paths the queue runner writes besides its state directory.
  runnerWritablePaths =
    optional (stateDirectory == null) dataDir
    ++ optional (cacheDir != null && !(lib.hasPrefix "${dataDir}/" cacheDir)) cacheDir;

  runnerExec = execLine (
    [
      "${runner.package}/bin/queue-runner"
      "--log-format"
      runner.logFormat
      "serve"
      "--config"
      runner.configFile
    ]
  )
  + " --agent-token-file ${credential "agent-token-file"}"
  + lib.optionalString (
    runner.signingKeyFile != null
  ) " --signing-key-file ${credential "signing-key-file"}";

  # Hardening of the queue runner when it runs unprivileged (the default).
  # Nothing here reaches builds: the queue runner builds nothing itself.
  runnerHardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    NoNewPrivileges = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    # No JIT here; the embedded PostgreSQL would need writable and
    # executable memory only with a JIT-enabled package.
    MemoryDenyWriteExecute = !(runner.postgresqlPackage.jitSupport or false);
    # gRPC and HTTP (inet), the Nix daemon and PostgreSQL (unix).
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" ];
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
  };

  # As root without a store socket the queue runner serves the local store
  # itself (`nix-daemon --stdio` children), which remounts the store
  # writable in a mount namespace of its own: it keeps the capabilities and
  # system calls that takes, and writes under /nix.
  runnerRootHardening = {
    ProtectSystem = "full";
    ProtectHome = true;
    PrivateTmp = true;
    NoNewPrivileges = true;
  };

  # ---------------------------------------------------------------- builder agent

  # One flag per setting: `--name value`, a list as `--name a b`, `true` as
  # a bare `--name`; null, false and empty lists are left out.
  agentFlag =
    name: value:
    if value == null || value == false || value == [ ] then
      [ ]
    else if value == true then
      [ "--${name}" ]
    else if builtins.isList value then
      [ "--${name}" ] ++ map toString value
    else
      [
        "--${name}"
        (toString value)
      ];
  agentExec = execLine (
    [
      "${agent.package}/bin/builder-agent"
      "--log-format"
      agent.logFormat
      "--token-file"
      agent.tokenFile
    ]
    ++ lib.concatLists (lib.mapAttrsToList agentFlag agent.settings)
  );
  agentUsesChildStore = agent.settings."store-socket" == null;
  agentState = "sluice-builder-agent";
in
{
  options.services.sluice = {
    queueRunner = {
      enable = mkEnableOption "the Sluice queue runner (`queue-runner serve`)";

      package = mkOption {
        type = types.package;
        description = "The package whose `bin/queue-runner` runs.";
      };

      user = mkOption {
        type = types.str;
        default = "sluice";
        description = ''
          User the queue runner runs as; created when left at `sluice`. Its
          home is the data directory. `root` only with `settings."store-socket"`
          set to null (the queue runner then serves the local store itself).
        '';
      };

      group = mkOption {
        type = types.str;
        default = "sluice";
        description = ''
          Group of the queue runner's files (build logs, a `file://` binary
          cache); created when left at `sluice`. Files are group-readable
          (umask 0027): put the web UI's or a web server's user in it.
        '';
      };

      agentTokenFile = mkOption {
        type = types.path;
        example = "/run/secrets/sluice-agent-tokens";
        description = ''
          File with the tokens agents present, one per line (`name:token`, or
          a bare token of at least 16 characters). Read by systemd and handed
          to the service as a credential, so it may stay readable by root
          only. Keep it out of the Nix store: a path literal would copy it
          there, readable by everyone.
        '';
      };

      signingKeyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/sluice-cache-key";
        description = ''
          Secret key that signs what goes to the binary cache, in the
          `name:base64` format `nix-store --generate-binary-cache-key` writes.
          Handed to the service as a credential, like `agentTokenFile`.
        '';
      };

      environmentFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/sluice-environment";
        description = ''
          File of `NAME=value` lines for the service's environment, for
          secrets that must not be in the Nix store, e.g. `DATABASE_URL` with
          a password (it wins over `settings."database-url"`).
        '';
      };

      createLocalDatabase = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Run PostgreSQL on this machine (`services.postgresql`) with a
          database and a role named after `user`, reached over its Unix
          socket, and point `settings."database-url"` at it. Left false with
          no database URL, the queue runner starts a private PostgreSQL of
          its own under the data directory instead.
        '';
      };

      postgresqlPackage = mkOption {
        type = types.package;
        default = pkgs.postgresql;
        defaultText = lib.literalExpression "pkgs.postgresql";
        description = ''
          PostgreSQL whose binaries run the embedded database (used only
          without `settings."database-url"` and `createLocalDatabase`).
        '';
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the port of `settings.\"grpc-listen\"`, which agents dial.";
      };

      logFormat = mkOption {
        type = types.enum [
          "text"
          "json"
        ];
        default = "text";
        description = "Log line format: text, or one JSON object per line.";
      };

      stopTimeout = mkOption {
        type = types.ints.positive;
        default = runner.settings."shutdown-timeout-s" + 30;
        defaultText = lib.literalExpression ''settings."shutdown-timeout-s" + 30'';
        description = ''
          Seconds systemd waits for the queue runner to stop (TimeoutStopSec)
          before it kills it: enough to flush its pending database writes
          and stop the embedded PostgreSQL.
        '';
      };

      settings = mkOption {
        default = { };
        description = ''
          Settings of `queue-runner serve`, rendered into its TOML file
          (`examples/sluice.toml` explains each key). Keys not listed here
          pass through as they are, so a setting newer than this module can
          be used; `serve` refuses a key it does not know.
        '';
        type = types.submodule {
          freeformType = toml.type;
          options = {
            "database-url" = setting types.str ''
              PostgreSQL URL of the Hydra database, e.g.
              `postgres://hydra@localhost/hydra?host=/run/postgresql`. Null:
              a private PostgreSQL under the data directory, started and
              stopped by the queue runner. A URL with a password belongs in
              `environmentFile` (as `DATABASE_URL`), not here.
            '';
            "data-dir" = mkOption {
              type = types.strMatching "/.*";
              default = "/var/lib/sluice";
              description = ''
                State directory: build logs (the web UI's HYDRA_DATA), GC
                roots, and the embedded database. Under /var/lib it is the
                unit's StateDirectory.
              '';
            };
            "grpc-listen" = mkOption {
              type = types.str;
              default = "127.0.0.1:50051";
              example = "0.0.0.0:50051";
              description = "Address the builder agents dial.";
            };
            "http-listen" = mkOption {
              type = types.str;
              default = "127.0.0.1:9198";
              description = "Address of the dashboard (/), /status, /status/machines and /metrics.";
            };
            "store-socket" = mkOption {
              type = types.nullOr types.str;
              default = "/nix/var/nix/daemon-socket/socket";
              description = ''
                The Nix daemon socket of the queue runner's store. The module
                defaults to the system daemon, so the queue runner runs
                unprivileged and is made a trusted user of the daemon (it
                adds the outputs agents upload). Null: the queue runner
                serves the local store itself, which needs `user = "root"`.
              '';
            };
            "unsupported-grace-s" = setting types.ints.unsigned ''
              Seconds a step waits for a machine that can build its system and
              features before its builds fail as unsupported (binary's default: 120).
            '';
            "max-tries" = setting types.ints.positive ''
              Attempts at a step that fails for infrastructure reasons before
              its builds fail (binary's default: 5).
            '';
            "retry-interval-s" = setting types.ints.unsigned ''
              Seconds before the first retry of such a step; later ones wait
              longer (binary's default: 60).
            '';
            "max-log-bytes" = setting types.ints.unsigned ''
              Largest build log kept per step (binary's default: 64 MiB).
            '';
            "max-output-bytes" = setting types.ints.unsigned ''
              Largest total NAR size of a step's outputs (binary's default: 2 GiB).
            '';
            "shutdown-timeout-s" = mkOption {
              type = types.ints.unsigned;
              default = 30;
              description = ''
                Seconds a shutdown waits for pending database writes (the
                binary's default too). `stopTimeout` follows it.
              '';
            };
            "max-pending-writes" = setting types.ints.positive ''
              Database writes queued at most before dispatching pauses
              (binary's default: 4096).
            '';
            "load-batch" = setting types.ints.positive ''
              Queued builds one load reads at most (binary's default: 250).
            '';
            "lease-s" = setting types.ints.positive ''
              Seconds a disconnected agent keeps its running steps, and that a
              restarted queue runner waits for agents to report theirs
              (binary's default: 30).
            '';
            "max-cpu-pressure" = setting (types.numbers.between 0 100) ''
              An agent whose CPU pressure (PSI some avg10, percent) is above
              this gets no new steps; 0 turns it off (binary's default: 0).
            '';
            "min-free-disk-mb" = setting types.ints.unsigned ''
              An agent with less free space (MiB) in its store or build
              directory gets no new steps; 0 turns it off (binary's default: 0).
            '';
            "store-connections" = setting types.ints.positive ''
              Store connections for control work (binary's default: 8; at
              least 2).
            '';
            "transfer-connections" = setting types.ints.positive ''
              Store connections for the agents' NAR transfers (binary's default: 16).
            '';
            "dispatch-order" = setting (types.enum [
              "critical-path"
              "hydra"
            ]) "Which runnable step goes first (binary's default: critical-path).";
            "binary-cache" = setting types.str ''
              Store URI every output (and its closure) is copied to before its
              build counts as finished: `file:///path` or
              `s3://bucket?region=...&endpoint=...&profile=...`. Signed with
              `signingKeyFile`. A `file://` directory is created and made
              writable for the service. S3 credentials come from the
              environment (`environmentFile`: `AWS_ACCESS_KEY_ID=...`) or
              from `.aws/credentials` in the data directory (the service's
              home).
            '';
            "binary-cache-compression" = setting (types.enum [
              "zstd"
              "xz"
              "none"
            ]) "Compression of the NARs uploaded to the binary cache (binary's default: zstd).";
            "status-interval-s" = setting types.ints.positive ''
              Seconds between writes of the queue runner's status to the
              database's SystemStatus row (which older Hydra web UIs read),
              and between the dashboard's reads of the queue and of recent
              failures (binary's default: 5).
            '';
          };
        };
      };

      configFile = mkOption {
        type = types.path;
        readOnly = true;
        default = toml.generate "sluice-queue-runner.toml" runnerSettings;
        defaultText = lib.literalMD "`settings`, rendered as TOML";
        description = "The TOML file `serve` reads (`--config`), rendered from `settings`.";
      };
    };

    builderAgent = {
      enable = mkEnableOption "a Sluice builder agent (`builder-agent`)";

      package = mkOption {
        type = types.package;
        description = "The package whose `bin/builder-agent` runs.";
      };

      tokenFile = mkOption {
        type = types.path;
        example = "/run/secrets/sluice-agent-token";
        description = ''
          File holding this agent's token: its first line that is neither
          empty nor a `#` comment (of a `name:token` line, the part after the
          `:`). The agent runs as root and reads it itself. Keep it out of
          the Nix store.
        '';
      };

      logFormat = mkOption {
        type = types.enum [
          "text"
          "json"
        ];
        default = "text";
        description = "Log line format: text, or one JSON object per line.";
      };

      stopTimeout = mkOption {
        type = types.ints.positive;
        default = agent.settings."drain-timeout-s" + 60;
        defaultText = lib.literalExpression ''settings."drain-timeout-s" + 60'';
        description = ''
          Seconds systemd waits for the agent to stop (TimeoutStopSec). A
          stopping agent drains: its running steps finish and their results
          are delivered, for up to `settings."drain-timeout-s"`; past that it
          aborts them (the queue runner retries them elsewhere). Keep this
          above the drain timeout, or systemd kills the builds first.
        '';
      };

      settings = mkOption {
        default = { };
        description = ''
          Flags of `builder-agent`, each named like its flag (`builder-agent
          --help` explains them). Other names pass through as flags, so a
          flag newer than this module can be used.
        '';
        type = types.submodule {
          freeformType = types.attrsOf (
            types.nullOr (
              types.oneOf [
                types.bool
                types.int
                types.float
                types.str
                (types.listOf types.str)
              ]
            )
          );
          options = {
            "queue-runner" = mkOption {
              type = types.str;
              example = "http://queue-runner.example.org:50051";
              description = "The queue runner's gRPC address.";
            };
            name = setting types.str "The name the queue runner shows for this machine (default: the host name).";
            systems = mkOption {
              type = types.listOf types.str;
              default = [ ];
              example = [
                "x86_64-linux"
                "i686-linux"
              ];
              description = "Systems this machine builds for (empty: the local Nix's system and `builtin`).";
            };
            features = mkOption {
              type = types.listOf types.str;
              default = [ ];
              example = [
                "kvm"
                "big-parallel"
              ];
              description = "Features this machine supports.";
            };
            "mandatory-features" = mkOption {
              type = types.listOf types.str;
              default = [ ];
              description = "Features a step must require to be built here.";
            };
            "max-jobs" = setting types.ints.positive ''
              Steps built at once (default: the number of slots, or 1 with
              pinning off).
            '';
            prefetch = setting types.ints.unsigned ''
              Steps taken ahead of the free slots (default: one per slot).
            '';
            pinning = setting (types.enum [
              "on"
              "off"
            ]) "Pin each step's process tree to a slot of the machine (default: on).";
            slots = setting types.ints.positive ''
              Divide the machine into this many slots (with `cpus-per-slot`)
              instead of one per NUMA node.
            '';
            "cpus-per-slot" = setting types.ints.positive "CPUs in each of the `slots` slots.";
            "sysfs-root" = setting types.str "Where sysfs is (default: /sys).";
            "cgroup-root" = setting types.str ''
              Where the cgroup hierarchies are mounted (default:
              /sys/fs/cgroup). The unit delegates its cgroup to the agent
              (Delegate=yes), so each step gets a cgroup of its own.
            '';
            "speed-factor" = setting types.number "Relative speed of this machine (default: 1).";
            "store-socket" = setting types.str ''
              Nix daemon socket of the store to build in. Null (the default):
              the agent serves the local store with `nix-daemon --stdio`
              children, so builds are its descendants and are pinned and put
              in cgroups; builds a daemon runs are not.
            '';
            "store-dir" = setting types.str ''
              The store's real directory, whose filesystem's free space the
              agent reports (default: /nix/store).
            '';
            "build-dir" = setting types.str ''
              Where builds make their temporary directories (the Nix
              daemon's build-dir, else its TMPDIR), whose filesystem's free
              space the agent reports (default: $TMPDIR, else /tmp).
            '';
            "reconnect-min-ms" = setting types.ints.unsigned "First delay before reconnecting (default: 500).";
            "reconnect-max-ms" = setting types.ints.unsigned "Longest delay between reconnections (default: 60000).";
            "drain-timeout-s" = mkOption {
              type = types.ints.unsigned;
              default = 600;
              description = ''
                Seconds a stopping agent lets its running steps finish (the
                binary's default too). `stopTimeout` follows it.
              '';
            };
          };
        };
      };
    };
  };

  config = mkMerge [
    (mkIf runner.enable {
      assertions = [
        {
          assertion = runnerUsesDaemon || runner.user == "root";
          message = ''
            services.sluice.queueRunner: without settings."store-socket" the queue
            runner serves the local Nix store itself, which needs user = "root".
          '';
        }
        {
          assertion = !(runner.settings ? "agent-token-file" || runner.settings ? "signing-key-file");
          message = ''
            services.sluice.queueRunner: set agentTokenFile and signingKeyFile, not
            settings."agent-token-file" or settings."signing-key-file": the files
            are handed over as credentials.
          '';
        }
        {
          assertion = !(runner.createLocalDatabase && runner.settings."database-url" == null);
          message = ''
            services.sluice.queueRunner: createLocalDatabase needs settings."database-url"
            (the module sets it unless it is overridden with null).
          '';
        }
      ];

      services.sluice.queueRunner.settings."database-url" = mkIf runner.createLocalDatabase (
        lib.mkDefault "postgres://${runner.user}@localhost/${runner.user}?host=/run/postgresql"
      );

      services.postgresql = mkIf runner.createLocalDatabase {
        enable = true;
        ensureDatabases = [ runner.user ];
        ensureUsers = [
          {
            name = runner.user;
            ensureDBOwnership = true;
          }
        ];
      };

      users.users = mkIf (runner.user == "sluice") {
        sluice = {
          isSystemUser = true;
          group = runner.group;
          home = dataDir;
          description = "Sluice queue runner";
        };
      };
      users.groups = mkIf (runner.group == "sluice") { sluice = { }; };

      # The queue runner adds the outputs agents upload to the store, which
      # the daemon allows trusted users only.
      nix.settings.trusted-users = mkIf (runnerUsesDaemon && runner.user != "root") [ runner.user ];

      networking.firewall.allowedTCPPorts = mkIf runner.openFirewall [
        (portOf runner.settings."grpc-listen")
      ];

      # `queue-runner submit` and `migrate`, for the operator.
      environment.systemPackages = [ runner.package ];

      systemd.tmpfiles.rules = map (dir: "d ${dir} 0750 ${runner.user} ${runner.group} - -") (
        optional (stateDirectory == null) dataDir ++ optional (cacheDir != null) cacheDir
      );

      systemd.services.sluice-queue-runner = {
        description = "Sluice queue runner";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ optional runnerUsesDaemon "nix-daemon.socket";
        after = [
          "network-online.target"
        ]
        ++ optional runnerUsesDaemon "nix-daemon.socket"
        ++ optionals runner.createLocalDatabase [
          "postgresql.service"
          # Where newer nixpkgs create the database and the role.
          "postgresql-setup.service"
        ];
        requires = optional runner.createLocalDatabase "postgresql.service";
        # `nix-daemon --stdio` when it serves the store itself.
        path = [ config.nix.package ];
        environment = {
          # Nix's per-user files, whoever the user is.
          HOME = dataDir;
        }
        // lib.optionalAttrs embeddedDatabase {
          # Where the embedded database's initdb and postgres are.
          SLUICE_PG_BIN = "${runner.postgresqlPackage}/bin";
        };
        serviceConfig = {
          # READY=1 once the schema is migrated and both listeners are bound.
          Type = "notify";
          ExecStart = runnerExec;
          Restart = "on-failure";
          RestartSec = 5;
          # A first start may initialise the embedded database and migrate
          # a large Hydra database.
          TimeoutStartSec = 600;
          # SIGTERM stops serve cleanly: no new work, pending writes
          # flushed, agents told, the embedded PostgreSQL stopped.
          KillSignal = "SIGTERM";
          # Only serve gets it: the embedded PostgreSQL, in the same
          # cgroup, is stopped by serve once its writes are flushed (it
          # would refuse them if it got SIGTERM too). What is left after
          # serve exits is killed.
          KillMode = "mixed";
          TimeoutStopSec = runner.stopTimeout;
          User = runner.user;
          Group = runner.group;
          UMask = "0027";
          LoadCredential = [
            "agent-token-file:${toString runner.agentTokenFile}"
          ]
          ++ optional (runner.signingKeyFile != null) "signing-key-file:${toString runner.signingKeyFile}";
          EnvironmentFile = mkIf (runner.environmentFile != null) (toString runner.environmentFile);
          StateDirectory = mkIf (stateDirectory != null) stateDirectory;
          StateDirectoryMode = "0750";
          WorkingDirectory = dataDir;
          ReadWritePaths = runnerWritablePaths;
        }
        // (if runnerUsesDaemon then runnerHardening else runnerRootHardening);
      };
    })

    (mkIf agent.enable {
      assertions = [
        {
          assertion = (agent.settings.slots == null) == (agent.settings."cpus-per-slot" == null);
          message = ''
            services.sluice.builderAgent: settings.slots and settings."cpus-per-slot"
            go together.
          '';
        }
        {
          assertion = agent.stopTimeout > agent.settings."drain-timeout-s";
          message = ''
            services.sluice.builderAgent: stopTimeout (${toString agent.stopTimeout} s) must be
            longer than settings."drain-timeout-s" (${toString agent.settings."drain-timeout-s"} s),
            or systemd kills the builds before the drain ends.
          '';
        }
      ];

      systemd.services.sluice-builder-agent = {
        description = "Sluice builder agent";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ optional (!agentUsesChildStore) "nix-daemon.socket";
        # Stopped before the network goes down, so a drain can deliver.
        after = [ "network-online.target" ] ++ optional (!agentUsesChildStore) "nix-daemon.socket";
        # nix-daemon (the store child) and nix-instantiate (the local system).
        path = [ config.nix.package ];
        # Nix's per-user files (configuration, caches) go to the state
        # directory, not to root's home, which the unit hides.
        environment.HOME = "/var/lib/${agentState}";
        serviceConfig = {
          # READY=1 once the agent runs: settings checked, dialing. Not
          # once registered: it is meant to run while the queue runner is
          # away (see builder-agent/src/main.rs).
          Type = "notify";
          ExecStart = agentExec;
          Restart = "on-failure";
          RestartSec = 5;
          # SIGTERM drains: no new steps, the running ones finish and are
          # delivered, then the agent exits 0.
          KillSignal = "SIGTERM";
          # Only the agent gets SIGTERM: its builds, in its cgroup, must
          # keep running through the drain. Whatever is left when the agent
          # exits (or at TimeoutStopSec) is killed.
          KillMode = "mixed";
          TimeoutStopSec = agent.stopTimeout;
          # Root: the local store is served in-process by `nix-daemon
          # --stdio` children (builds are their children, so they can be
          # pinned), and steps get cgroups of their own.
          User = "root";
          # The agent's cgroup is its own to divide: it moves itself into a
          # leaf and makes one cgroup per step, with the slot's cpuset.
          Delegate = true;
          StateDirectory = agentState;
          # As nix-daemon.service: builds inherit the limit.
          LimitNOFILE = 1048576;

          # Hardening, limited by what Nix builds need: everything below is
          # inherited by the store child and by every build.
          PrivateTmp = true; # build directories are made under /tmp
          ProtectSystem = "full"; # /usr, /boot and /etc read-only; /nix stays writable
          ProtectHome = true;
          # Builds already run with no_new_privs unless Nix's
          # `allow-new-privileges` is set, which this disables.
          NoNewPrivileges = true;
          # Left out on purpose:
          # - ProtectKernelTunables, ProtectKernelLogs, ProtectProc: the
          #   sandbox mounts a fresh /proc in a user namespace, which the
          #   kernel refuses while parts of /proc are overmounted;
          # - ProtectControlGroups: the agent writes its delegated cgroups;
          # - PrivateDevices: builds may need /dev/kvm (the kvm feature);
          # - RestrictNamespaces, SystemCallFilter, CapabilityBoundingSet:
          #   the sandbox unshares namespaces, mounts, pivots its root,
          #   changes to the build users and installs its own seccomp
          #   filter;
          # - MemoryDenyWriteExecute: compilers and test suites run JITs.
        };
      };
    })
  ];
}
