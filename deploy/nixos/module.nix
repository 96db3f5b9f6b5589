# NixOS module for nixfarm: the coordinator and the agent as sandboxed services with typed
# options. Settings are rendered to the same TOML files the binaries read (see
# deploy/coordinator.toml and deploy/agent.toml for every field and its default). An
# option left at null is left out of the file, so the binary's own default applies (the
# agent's CPU count, detected features, host name...).
#
#   imports = [ ./deploy/nixos/module.nix ];
#   services.nixfarm.package = nixfarm;   # a build of this repository (deploy/README.md)
#   services.nixfarm.coordinator = { enable = true; settings.listen = "0.0.0.0:7420";
#     agentTokenFile = "/run/secrets/nixfarm-agent-token"; };
#   services.nixfarm.agent = { enable = true; settings.coordinator = "https://farm:7420";
#     agentTokenFile = "/run/secrets/nixfarm-agent-token"; environmentFile = "/run/secrets/cachix.env"; };
#
# Secret files (tokens, keys) are absolute paths outside the Nix store, read by systemd as
# credentials (LoadCredential=) and handed to the service under /run/credentials/UNIT/.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkEnableOption mkOption mkIf types optionalAttrs literalExpression;
  cfg = config.services.nixfarm;
  cfgC = cfg.coordinator;
  cfgA = cfg.agent;
  toml = pkgs.formats.toml { };
  # TOML has no null: unset optional settings are left out (the binaries' defaults apply).
  clean = lib.filterAttrsRecursive (_: v: v != null);
  credC = "/run/credentials/nixfarm-coordinator.service";
  credA = "/run/credentials/nixfarm-agent.service";

  # A secret: a file outside the store (a path literal such as ./token would be copied into
  # the world-readable store, so only strings are accepted).
  secretFile = what: example: mkOption {
    type = types.nullOr ((types.addCheck types.str (s: lib.hasPrefix "/" s && !lib.hasPrefix "${builtins.storeDir}/" s)) // {
      description = "absolute path of a file outside the Nix store";
    });
    default = null;
    inherit example;
    description = "File holding ${what}, loaded as a systemd credential (never copied into the Nix store).";
  };
  # The ranges the binaries check at start-up, so a bad value fails at evaluation instead.
  between = lo: hi: default: description:
    mkOption { type = types.ints.between lo hi; inherit default description; };
  atLeast = lo: default: description: mkOption {
    type = (types.addCheck types.int (x: x >= lo)) // { description = "integer of at least ${toString lo}"; };
    inherit default description;
  };
  nullStr = description: mkOption { type = types.nullOr types.str; default = null; inherit description; };

  # Sandboxing shared by both units; deploy/systemd/*.service carry the same lines with the
  # reasons (`systemd-analyze security` rates them 1.1 of 10, "OK").
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateMounts = true;
    # Root and the service's user map to themselves; the Nix daemon still sees the real UID.
    PrivateUsers = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RemoveIPC = true;
    LockPersonality = true;
    # Checked for the agent with Nix 2.8: evaluation, fetching (tarballs, git) and builds
    # through the daemon map no writable and executable memory.
    MemoryDenyWriteExecute = true;
    # The Nix daemon's socket and name resolution (AF_UNIX); agents, the CLI, caches and
    # forges (AF_INET/6). The host's network stays: peers connect from anywhere.
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
    # A refused call fails with EPERM instead of killing the process.
    SystemCallErrorNumber = "EPERM";
    UMask = "0077";
    LimitNOFILE = 65536;
  };

  coordinatorFile = toml.generate "nixfarm-coordinator.toml" (clean (lib.foldl' lib.recursiveUpdate cfgC.settings [
    (optionalAttrs (cfgC.agentTokenFile != null) { auth.agent_token_file = "${credC}/agent-token"; })
    (optionalAttrs (cfgC.agentTokensFile != null) { auth.agent_tokens_file = "${credC}/agent-tokens"; })
    (optionalAttrs (cfgC.clientTokenFile != null) { auth.client_token_file = "${credC}/client-token"; })
    (optionalAttrs (cfgC.tlsKeyFile != null) { tls.key_file = "${credC}/tls-key"; })
  ]));
  agentFile = toml.generate "nixfarm-agent.toml" (clean (cfgA.settings
    // optionalAttrs (cfgA.agentTokenFile != null) { token_file = "${credA}/agent-token"; }
    // optionalAttrs (cfgA.signingKeyFile != null) { signing_key_file = "${credA}/cache-signing-key"; }
    // optionalAttrs (cfgA.tlsKeyFile != null) { tls_key_file = "${credA}/tls-key"; }));
  packageMissing = "services.nixfarm.package is not set and pkgs.nixfarm does not exist: set services.nixfarm.package to a build of nixfarm (deploy/README.md, section NixOS, shows one).";
  # Also where the binaries are used, so reading a unit before the assertions says why.
  package = if cfg.package != null then cfg.package else throw packageMissing;
  stateDirC = cfgC.settings.state_dir;
  agentWorkDir = "/var/lib/nixfarm-agent";
  gcRootsParent = "/nix/var/nix/gcroots/per-user";
in
{
  options.services.nixfarm = {
    package = mkOption {
      type = types.nullOr types.package;
      default = pkgs.nixfarm or null;
      defaultText = literalExpression "pkgs.nixfarm or null";
      example = literalExpression "inputs.nixfarm.packages.\${pkgs.system}.default";
      description = ''
        Package providing bin/nixfarm-coordinator and bin/nixfarm-agent. Nixpkgs has none:
        set it to a build of this repository (deploy/README.md shows one), or add
        `pkgs.nixfarm` with an overlay. Enabling a service without it is an error.
      '';
    };

    coordinator = {
      enable = mkEnableOption "the nixfarm coordinator";
      agentTokenFile = secretFile "the join token agents present" "/run/secrets/nixfarm-agent-token";
      agentTokensFile = secretFile "tokens each bound to one agent name, a `NAME TOKEN` line per agent" "/run/secrets/nixfarm-agent-tokens";
      clientTokenFile = secretFile "the token the CLI presents" "/run/secrets/nixfarm-client-token";
      tlsKeyFile = secretFile "the PEM private key of settings.tls.cert_file" "/run/secrets/nixfarm-coordinator-tls.key";
      settings = mkOption {
        description = "Coordinator settings (nixfarm-coordinator.toml; deploy/coordinator.toml describes each). [auth] and tls.key_file come from the *File options.";
        default = { };
        type = types.submodule {
          freeformType = toml.type;
          options = {
            listen = mkOption { type = types.str; default = "127.0.0.1:7420"; description = "Address and port of the gRPC server (agents and the CLI). Beyond loopback, set agentTokenFile, clientTokenFile and TLS."; };
            state_dir = mkOption { type = types.str; default = "/var/lib/nixfarm"; description = "SQLite database and uploaded snapshots; below /var/lib (it becomes the unit's StateDirectory)."; };
            metrics_listen = nullStr "Address of the Prometheus /metrics endpoint (plain HTTP). Default (null): off.";
            allow_local_flake_refs = mkOption { type = types.bool; default = false; description = "Accept flake references that agents resolve on their own disk (path:, git+file:, …): a single-user farm only."; };
            allow_unisolated_evaluation = mkOption { type = types.bool; default = false; description = "Run even where evaluations, smoke tests and builds in the agent's own store cannot be isolated from its secret files (the unit allows the namespaces they need); a repository's code could then read the agent's token and signing key. Default: refuse to start."; };
            run_caches = mkOption { type = types.listOf types.str; default = [ ]; description = "The caches runs may name (--cache); agents substitute from them as root. Empty: any."; };
            run_cache_keys = mkOption { type = types.listOf types.str; default = [ ]; description = "The public keys runs may give agents to trust (--trusted-public-key). Empty: any."; };
            tls = {
              cert_file = nullStr "PEM certificate chain; with a key (tlsKeyFile) it turns TLS on for every connection. Default (null): plain HTTP/2, only safe on loopback.";
              key_file = nullStr "PEM private key, read by the service itself. Prefer tlsKeyFile, which keeps it a credential; not both.";
              client_ca_file = nullStr "CA of agents' client certificates (mTLS): such an agent needs no join token. Default (null): none.";
              revoked_certs_file = nullStr "Revoked client certificates, one SHA-256 fingerprint per line (as openssl x509 -noout -fingerprint -sha256 prints it); read again within two seconds of a change: the agent is cut off and its farm cache token withdrawn. Needs client_ca_file. Default (null): none.";
            };
            scheduler = {
              eval_chunk_size = between 1 10000 16 "Attributes per evaluation task.";
              list_eval_max = between 0 10000 32 "A repository of at most this many attributes is evaluated by the process that lists it (0: never).";
              eval_memory_mib = mkOption {
                type = (types.addCheck types.int (x: x == 0 || (x >= 256 && x <= 1048576))) // { description = "0, or an integer from 256 to 1048576"; };
                default = 4096;
                description = "Memory cap per evaluation worker process, MiB (0: none).";
              };
              max_infra_retries = between 0 100 3 "Retries of a job after an infrastructure failure.";
              max_runs_in_flight = between 1 100000 64 "Runs evaluating or building at once.";
              lease_secs = between 2 86400 60 "Seconds an agent may be silent before its jobs are requeued (at least twice heartbeat_secs).";
              heartbeat_secs = between 1 3600 10 "Seconds between agent heartbeats.";
              locality = mkOption { type = types.bool; default = true; description = "Of equally urgent derivations, give an agent the one whose inputs it built."; };
              cross_check_evaluation = mkOption { type = types.bool; default = false; description = "Have every evaluation task answered by two different agents and taken only when both agree: an agent that lies about what a package evaluates to fails the run. Doubles evaluation work; runs wait for two connected agents."; };
              cross_check_builds = mkOption { type = types.bool; default = false; description = "Have every derivation an agent builds (fixed-output ones aside) built again by a different agent, which compares its outputs with the cache's copy (nix-store --check): an agent that pushes something else, or a build that is not reproducible, makes the package not-reproducible, and the farm cache stops serving those outputs. With the farm cache on, a run's own cache (--cache) gets only checked outputs, pushed by the checking agent. Doubles build work."; };
              cross_check_wait_secs = between 10 86400 600 "Longest a cross-check waits, seconds, with no agent connected that could take it; then the run (evaluation) or the build fails, saying why.";
            };
            limits = {
              snapshot_max_bytes = between 1048576 4294967296 268435456 "Largest source snapshot (sum of its file sizes), bytes.";
              snapshot_max_files = between 1 1000000 100000 "Most files in one snapshot.";
              max_message_bytes = between 1048576 1073741824 67108864 "Largest gRPC message from agents, bytes (the CLI's are held to 4 MiB).";
              max_concurrent_uploads = between 1 1024 16 "Snapshot uploads in progress at once, from all clients.";
              max_uploads_per_client = between 1 1024 4 "Snapshot uploads in progress at once from one address (at most max_concurrent_uploads).";
              upload_idle_secs = between 1 3600 30 "Seconds an upload may go without sending 64 KiB (or ending) before it is aborted.";
            };
            http = {
              listen = nullStr "Address and port of the web UI, its JSON API and readiness badges (plain HTTP). With clientTokenFile, every page needs that token. Default (null): off.";
              allow_cancel = mkOption { type = types.bool; default = false; description = "Offer a cancel button on running runs (a POST form with a CSRF token). Default: read-only."; };
              public_badges = mkOption { type = types.bool; default = false; description = "Serve /badge/…svg without the client token, so a public README can show it."; };
              trusted_proxies = mkOption { type = types.listOf types.str; default = [ ]; example = [ "127.0.0.1" ]; description = "Reverse proxies in front of the web UI (addresses or ranges such as 10.0.0.0/8): wrong tokens then count against the client their X-Forwarded-For names. Default: none (the header is ignored)."; };
            };
            farm_cache = {
              enabled = mkOption { type = types.bool; default = true; description = "Serve the coordinator's own binary cache, which runs without --cache move derivations and outputs through (beyond loopback only with agentTokenFile)."; };
              listen = nullStr "Address and port of the farm cache. Default (null): the gRPC address with any free port (agents are told which).";
              max_nar_bytes = between 1048576 1099511627776 68719476736 "Largest NAR accepted, bytes.";
              max_bytes = atLeast 16777216 21474836480 "NAR bytes kept; least recently used paths are evicted past it.";
            };
          };
        };
      };
    };

    agent = {
      enable = mkEnableOption "a nixfarm agent";
      agentTokenFile = secretFile "the join token (or NIXFARM_AGENT_TOKEN in environmentFile)" "/run/secrets/nixfarm-agent-token";
      signingKeyFile = secretFile "the Nix secret key that signs what the agent pushes to caches" "/run/secrets/nixfarm-cache-signing-key";
      tlsKeyFile = secretFile "the PEM key of settings.tls_cert_file (mTLS)" "/run/secrets/nixfarm-agent-tls.key";
      environmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/nixfarm-agent.env";
        description = "Environment file (outside the store) with CACHIX_AUTH_TOKEN, CACHIX_SIGNING_KEY or NIXFARM_AGENT_TOKEN.";
      };
      settings = mkOption {
        description = "Agent settings (nixfarm-agent.toml; deploy/agent.toml describes each). token_file, signing_key_file and tls_key_file come from the *File options.";
        default = { };
        type = types.submodule {
          freeformType = toml.type;
          options = {
            coordinator = mkOption { type = types.str; default = "http://127.0.0.1:7420"; example = "https://farm.example.org:7420"; description = "Coordinator URL."; };
            name = nullStr "Name the agent registers under, unique per farm (letters, digits, - _ . @). Default (null): the host name, read by the agent.";
            systems = mkOption { type = types.listOf types.str; default = [ "x86_64-linux" ]; example = literalExpression "[ pkgs.stdenv.hostPlatform.system ]"; description = "Systems this agent builds for (the binary's default; set it on other architectures)."; };
            features = mkOption { type = types.nullOr (types.listOf types.str); default = null; example = [ "big-parallel" "kvm" ]; description = "System features offered (requiredSystemFeatures). Default (null): big-parallel, benchmark and nixos-test, plus kvm when /dev/kvm exists (the agent looks)."; };
            max_jobs = mkOption { type = types.nullOr (types.ints.between 1 4096); default = null; description = "Jobs run at once. Default (null): the number of CPUs the agent may use."; };
            eval_workers = between 1 256 2 "Evaluation worker processes per evaluation job.";
            eval_timeout_secs = between 10 604800 3600 "Seconds one evaluation process may run (a repository that imports from derivations builds while it evaluates); past it its attributes fail, one by one.";
            work_dir = mkOption { type = types.str; default = agentWorkDir; description = "Scratch directory for unpacked sources (the unit's state directory; another one is created by tmpfiles and made writable)."; };
            nix_bin = nullStr "Directory holding nix and nix-store. Default (null): found through PATH, which the unit sets to config.nix.package.";
            drain_timeout_secs = between 0 604800 600 "On stop, seconds running jobs may finish before they are handed back (the unit's stop timeout follows).";
            log_limit_bytes = between 0 67108864 1048576 "Bytes of live log streamed to the coordinator per job (the tail always travels).";
            min_free_mib = mkOption { type = types.ints.unsigned; default = 512; description = "MiB kept free in /nix/store's file system; below it no new jobs are taken (0: no check)."; };
            allow_local_flake_refs = mkOption { type = types.bool; default = false; description = "Evaluate flake references that read this host's disk (path:, git+file:, …): a single-user farm only."; };
            allow_unisolated_evaluation = mkOption { type = types.bool; default = false; description = "Run even where evaluations, smoke tests and builds in the agent's own store cannot be isolated from its secret files (the unit allows the namespaces they need); a repository's code could then read the agent's token and signing key. Default: refuse to start."; };
            run_caches = mkOption { type = types.listOf types.str; default = [ ]; description = "The run caches this agent substitutes from, as root; listed, it takes part only in runs with one of them or none of their own. Empty: any."; };
            allow_plain_http = mkOption { type = types.bool; default = false; description = "Send the join token to an http:// coordinator beyond this machine, in clear (refused by default; loopback is always allowed). Prefer https://."; };
            cachix_api_urls = mkOption { type = types.listOf types.str; default = [ ]; description = "Cachix API roots besides Cachix's own that this agent sends its CACHIX_AUTH_TOKEN to; a run naming another gets no push from it."; };
            gc_roots_dir = nullStr "GC roots of what each run still needs, below ${gcRootsParent} (the only part of Nix's gcroots the agent may write). Default (null): ${gcRootsParent}/nixfarm-agent/nixfarm-NAME.";
            tls_ca_file = nullStr "PEM CA of the coordinator's certificate (https:// URLs). Default (null): the public web PKI roots.";
            tls_cert_file = nullStr "PEM client certificate (mTLS), instead of the join token; its key is tlsKeyFile.";
            tls_key_file = nullStr "PEM key of tls_cert_file, read by the service itself. Prefer tlsKeyFile, which keeps it a credential; not both.";
          };
        };
      };
    };
  };

  config = lib.mkMerge [
    (mkIf (cfgC.enable || cfgA.enable) {
      assertions = [{
        assertion = cfg.package != null;
        message = packageMissing;
      }];
    })
    (mkIf cfgC.enable {
      assertions = [
        { assertion = lib.hasPrefix "/var/lib/" stateDirC && stateDirC != "/var/lib/";
          message = "services.nixfarm.coordinator.settings.state_dir must lie below /var/lib (it is the unit's StateDirectory), not ${stateDirC}."; }
        { assertion = cfgC.settings.scheduler.lease_secs >= 2 * cfgC.settings.scheduler.heartbeat_secs;
          message = "services.nixfarm.coordinator.settings.scheduler.lease_secs must be at least twice heartbeat_secs."; }
        { assertion = cfgC.settings.limits.max_uploads_per_client <= cfgC.settings.limits.max_concurrent_uploads;
          message = "services.nixfarm.coordinator.settings.limits.max_uploads_per_client must be at most max_concurrent_uploads."; }
        { assertion = cfgC.tlsKeyFile == null || cfgC.settings.tls.key_file == null;
          message = "services.nixfarm.coordinator: set tlsKeyFile or settings.tls.key_file, not both."; }
      ];
      systemd.services.nixfarm-coordinator = {
        description = "nixfarm coordinator";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        serviceConfig = hardening // {
          ExecStart = "${package}/bin/nixfarm-coordinator --config ${coordinatorFile}";
          LoadCredential =
            lib.optional (cfgC.agentTokenFile != null) "agent-token:${cfgC.agentTokenFile}"
            ++ lib.optional (cfgC.agentTokensFile != null) "agent-tokens:${cfgC.agentTokensFile}"
            ++ lib.optional (cfgC.clientTokenFile != null) "client-token:${cfgC.clientTokenFile}"
            ++ lib.optional (cfgC.tlsKeyFile != null) "tls-key:${cfgC.tlsKeyFile}";
          DynamicUser = true;
          StateDirectory = lib.removePrefix "/var/lib/" stateDirC;
          StateDirectoryMode = "0700";
          Restart = "on-failure";
          RestartSec = "2s";
          # It reads nothing of /proc but its own process.
          ProcSubset = "pid";
        };
      };
    })
    (mkIf cfgA.enable {
      assertions = [
        { assertion = cfgA.tlsKeyFile == null || cfgA.settings.tls_key_file == null;
          message = "services.nixfarm.agent: set tlsKeyFile or settings.tls_key_file, not both."; }
        { assertion = cfgA.settings.gc_roots_dir == null || lib.hasPrefix "${gcRootsParent}/" cfgA.settings.gc_roots_dir;
          message = "services.nixfarm.agent.settings.gc_roots_dir must lie below ${gcRootsParent} (Nix honours roots only under its gcroots, and the agent may write only there)."; }
      ];
      users.users.nixfarm-agent = {
        isSystemUser = true;
        group = "nixfarm-agent";
        # Not /var/empty: Nix keeps its fetcher cache under the home (see XDG_CACHE_HOME).
        home = agentWorkDir;
      };
      users.groups.nixfarm-agent = { };
      # It passes substituters, keys and netrc files to the daemon for each build.
      nix.settings.trusted-users = [ "nixfarm-agent" ];
      systemd.tmpfiles.rules = lib.optional (cfgA.settings.work_dir != agentWorkDir)
        "d ${cfgA.settings.work_dir} 0700 nixfarm-agent nixfarm-agent -";
      systemd.services.nixfarm-agent = {
        description = "nixfarm agent";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" "nix-daemon.socket" "nix-daemon.service" ];
        wants = [ "network-online.target" ];
        # nix and nix-store; git for git flake inputs; unshare and setpriv, which isolate
        # evaluations and smoke tests from the agent's secrets.
        path = [ config.nix.package pkgs.git pkgs.util-linux ];
        environment = {
          # Builds go through the daemon (builders run in its sandbox, not in this unit);
          # a local store would need namespaces, build users and a writable /nix.
          NIX_REMOTE = "daemon";
          # Nix's cache of fetched flake inputs, in the state directory.
          XDG_CACHE_HOME = "${agentWorkDir}/.cache";
        };
        serviceConfig = hardening // {
          ExecStart = "${package}/bin/nixfarm-agent --config ${agentFile}";
          LoadCredential =
            lib.optional (cfgA.agentTokenFile != null) "agent-token:${cfgA.agentTokenFile}"
            ++ lib.optional (cfgA.signingKeyFile != null) "cache-signing-key:${cfgA.signingKeyFile}"
            ++ lib.optional (cfgA.tlsKeyFile != null) "tls-key:${cfgA.tlsKeyFile}";
          EnvironmentFile = lib.optional (cfgA.environmentFile != null) cfgA.environmentFile;
          # A static user: the daemon trusts it by name (nix.settings.trusted-users).
          User = "nixfarm-agent";
          Group = "nixfarm-agent";
          StateDirectory = "nixfarm-agent";
          StateDirectoryMode = "0700";
          # Its GC roots (the daemon's socket needs no write access: connect() works on a
          # read-only mount) and a work_dir of another place.
          ReadWritePaths = [ gcRootsParent ]
            ++ lib.optional (cfgA.settings.work_dir != agentWorkDir) cfgA.settings.work_dir;
          # /dev/kvm is shown, never opened: the agent offers "kvm" when it exists; the
          # daemon's builders use it.
          BindReadOnlyPaths = [ "-/dev/kvm" ];
          # SIGTERM drains: no new jobs, running ones finish within drain_timeout_secs.
          KillSignal = "SIGTERM";
          TimeoutStopSec = cfgA.settings.drain_timeout_secs + 60;
          Restart = "on-failure";
          RestartSec = "5s";
          # Evaluations and smoke tests run in namespaces of the agent's own (user, mount,
          # PID, network) where its secret files are hidden and /proc shows only their own
          # processes. That /proc can be mounted only while nothing covers parts of the
          # unit's, hence no ProtectKernelTunables/Logs/Hostname (the agent is unprivileged: it can
          # write no sysctl nor read the kernel log either way); the mounts and the dropping
          # of the namespace's capabilities need @mount and capset.
          ProtectKernelTunables = false;
          ProtectKernelLogs = false;
          ProtectHostname = false;
          RestrictNamespaces = "user mnt pid net";
          SystemCallFilter = hardening.SystemCallFilter ++ [ "@mount" "capset" ];
        };
      };
    })
  ];
}
