# NixOS module for nixfarm: the coordinator and the agent as sandboxed services with typed
# options. Settings are rendered to the same TOML files the binaries read (see
# deploy/coordinator.toml and deploy/agent.toml for every field and its default).
#
#   imports = [ ./deploy/nixos/module.nix ];
#   services.nixfarm.coordinator = { enable = true; settings.listen = "0.0.0.0:7420";
#     agentTokenFile = "/run/secrets/nixfarm-agent-token"; };
#   services.nixfarm.agent = { enable = true; settings.coordinator = "http://farm:7420";
#     agentTokenFile = "/run/secrets/nixfarm-agent-token"; environmentFile = "/run/secrets/cachix.env"; };
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkEnableOption mkOption mkIf types optionalAttrs;
  cfgC = config.services.nixfarm.coordinator;
  cfgA = config.services.nixfarm.agent;
  toml = pkgs.formats.toml { };
  # TOML has no null: unset optional settings are left out (the binaries' defaults apply).
  clean = lib.filterAttrsRecursive (_: v: v != null);
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    NoNewPrivileges = true;
    ProtectKernelModules = true;
    ProtectControlGroups = true;
    LockPersonality = true;
    LimitNOFILE = 65536;
  };
in
{
  options.services.nixfarm = {
    package = mkOption {
      type = types.package;
      description = "Package providing nixfarm-coordinator and nixfarm-agent.";
    };

    coordinator = {
      enable = mkEnableOption "the nixfarm coordinator";
      agentTokenFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File with the join token agents present (loaded as a systemd credential).";
      };
      clientTokenFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File with the token the CLI presents.";
      };
      settings = mkOption {
        description = "Coordinator settings (nixfarm-coordinator.toml).";
        default = { };
        type = types.submodule {
          freeformType = toml.type;
          options = {
            listen = mkOption { type = types.str; default = "127.0.0.1:7420"; description = "gRPC listen address."; };
            state_dir = mkOption { type = types.str; default = "/var/lib/nixfarm"; description = "SQLite database and snapshots."; };
            metrics_listen = mkOption { type = types.nullOr types.str; default = null; description = "Address of the Prometheus /metrics endpoint."; };
            allow_local_flake_refs = mkOption { type = types.bool; default = false; description = "Accept flake references that agents resolve on their own disk (path:, git+file:, …): a single-user farm only."; };
            tls = {
              cert_file = mkOption { type = types.nullOr types.str; default = null; description = "PEM certificate chain; enables TLS."; };
              key_file = mkOption { type = types.nullOr types.str; default = null; description = "PEM private key (keep it out of the Nix store)."; };
              client_ca_file = mkOption { type = types.nullOr types.str; default = null; description = "CA of agents' client certificates (mTLS)."; };
            };
            scheduler = {
              eval_chunk_size = mkOption { type = types.ints.positive; default = 16; description = "Attributes per evaluation task."; };
              eval_memory_mib = mkOption { type = types.ints.unsigned; default = 4096; description = "Memory cap per evaluation process, MiB (0: none)."; };
              max_infra_retries = mkOption { type = types.ints.unsigned; default = 3; description = "Retries after an infrastructure failure."; };
              max_runs_in_flight = mkOption { type = types.ints.positive; default = 64; description = "Runs evaluating or building at once."; };
              lease_secs = mkOption { type = types.ints.positive; default = 60; description = "Agent silence before its jobs are requeued, seconds."; };
              heartbeat_secs = mkOption { type = types.ints.positive; default = 10; description = "Heartbeat interval, seconds."; };
            };
            limits = {
              snapshot_max_bytes = mkOption { type = types.ints.positive; default = 268435456; description = "Largest snapshot, bytes."; };
              snapshot_max_files = mkOption { type = types.ints.positive; default = 100000; description = "Most files per snapshot."; };
              max_message_bytes = mkOption { type = types.ints.positive; default = 67108864; description = "Largest gRPC message from agents, bytes."; };
              max_concurrent_uploads = mkOption { type = types.ints.positive; default = 16; description = "Snapshot uploads in progress at once."; };
              max_uploads_per_client = mkOption { type = types.ints.positive; default = 4; description = "Snapshot uploads in progress at once from one address."; };
              upload_idle_secs = mkOption { type = types.ints.positive; default = 30; description = "Seconds an upload may send nothing before it is aborted."; };
            };
            farm_cache = {
              enabled = mkOption { type = types.bool; default = true; description = "Serve the coordinator's own binary cache, which runs without --cache move derivations and outputs through."; };
              listen = mkOption { type = types.nullOr types.str; default = null; description = "Address of the farm cache (default: the gRPC address, any free port)."; };
              max_nar_bytes = mkOption { type = types.ints.positive; default = 68719476736; description = "Largest NAR accepted, bytes."; };
              max_bytes = mkOption { type = types.ints.positive; default = 21474836480; description = "NAR bytes kept; least recently used evicted past it."; };
            };
          };
        };
      };
    };

    agent = {
      enable = mkEnableOption "a nixfarm agent";
      agentTokenFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File with the join token.";
      };
      signingKeyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "Nix secret key file that signs pushed paths.";
      };
      environmentFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "Environment file with CACHIX_AUTH_TOKEN / CACHIX_SIGNING_KEY (kept out of the store).";
      };
      settings = mkOption {
        description = "Agent settings (nixfarm-agent.toml).";
        default = { };
        type = types.submodule {
          freeformType = toml.type;
          options = {
            coordinator = mkOption { type = types.str; default = "http://127.0.0.1:7420"; description = "Coordinator URL."; };
            name = mkOption { type = types.str; default = config.networking.hostName; description = "Agent name, unique per farm."; };
            systems = mkOption { type = types.listOf types.str; default = [ "x86_64-linux" ]; description = "Systems built for."; };
            features = mkOption { type = types.listOf types.str; default = [ "big-parallel" "benchmark" "nixos-test" ]; description = "System features offered."; };
            max_jobs = mkOption { type = types.ints.positive; default = 2; description = "Jobs at once."; };
            eval_workers = mkOption { type = types.ints.positive; default = 2; description = "Evaluation processes per job."; };
            work_dir = mkOption { type = types.str; default = "/var/lib/nixfarm-agent"; description = "Scratch directory."; };
            allow_local_flake_refs = mkOption { type = types.bool; default = false; description = "Evaluate flake references that read this host's disk (path:, git+file:, …): a single-user farm only."; };
            gc_roots_dir = mkOption { type = types.nullOr types.str; default = null; description = "GC roots of what each run still needs; below Nix's gcroots directory (default per-user/$USER/nixfarm-NAME)."; };
            tls_ca_file = mkOption { type = types.nullOr types.str; default = null; description = "CA of the coordinator's certificate."; };
            tls_cert_file = mkOption { type = types.nullOr types.str; default = null; description = "Client certificate (mTLS)."; };
            tls_key_file = mkOption { type = types.nullOr types.str; default = null; description = "Key of the client certificate."; };
            nix_bin = mkOption { type = types.str; default = "${config.nix.package}/bin"; description = "Directory of nix and nix-store."; };
            drain_timeout_secs = mkOption { type = types.ints.unsigned; default = 600; description = "Drain deadline on stop, seconds."; };
            log_limit_bytes = mkOption { type = types.ints.positive; default = 1048576; description = "Live log per job, bytes."; };
            min_free_mib = mkOption { type = types.ints.unsigned; default = 512; description = "MiB kept free in /nix/store's file system; below it no new jobs are taken (0: no check)."; };
          };
        };
      };
    };
  };

  config = lib.mkMerge [
    (mkIf cfgC.enable {
      systemd.services.nixfarm-coordinator = {
        description = "nixfarm coordinator";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        serviceConfig = hardening // {
          ExecStart = "${config.services.nixfarm.package}/bin/nixfarm-coordinator --config ${
            toml.generate "nixfarm-coordinator.toml" (clean cfgC.settings // {
              auth = optionalAttrs (cfgC.agentTokenFile != null) {
                agent_token_file = "/run/credentials/nixfarm-coordinator.service/agent-token";
              } // optionalAttrs (cfgC.clientTokenFile != null) {
                client_token_file = "/run/credentials/nixfarm-coordinator.service/client-token";
              };
            })}";
          LoadCredential =
            lib.optional (cfgC.agentTokenFile != null) "agent-token:${cfgC.agentTokenFile}"
            ++ lib.optional (cfgC.clientTokenFile != null) "client-token:${cfgC.clientTokenFile}";
          DynamicUser = true;
          StateDirectory = "nixfarm";
          StateDirectoryMode = "0700";
          Restart = "on-failure";
          PrivateDevices = true;
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
          MemoryDenyWriteExecute = true;
          SystemCallFilter = [ "@system-service" ];
        };
      };
    })
    (mkIf cfgA.enable {
      users.users.nixfarm-agent = { isSystemUser = true; group = "nixfarm-agent"; };
      users.groups.nixfarm-agent = { };
      nix.settings.trusted-users = [ "nixfarm-agent" ];
      systemd.services.nixfarm-agent = {
        description = "nixfarm agent";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" "nix-daemon.service" ];
        wants = [ "network-online.target" ];
        path = [ config.nix.package ];
        environment.NIX_REMOTE = "daemon";
        serviceConfig = hardening // {
          ExecStart = "${config.services.nixfarm.package}/bin/nixfarm-agent --config ${
            toml.generate "nixfarm-agent.toml" (clean cfgA.settings
              // optionalAttrs (cfgA.agentTokenFile != null) {
                token_file = "/run/credentials/nixfarm-agent.service/agent-token";
              }
              // optionalAttrs (cfgA.signingKeyFile != null) {
                signing_key_file = "/run/credentials/nixfarm-agent.service/cache-signing-key";
              })}";
          LoadCredential =
            lib.optional (cfgA.agentTokenFile != null) "agent-token:${cfgA.agentTokenFile}"
            ++ lib.optional (cfgA.signingKeyFile != null) "cache-signing-key:${cfgA.signingKeyFile}";
          EnvironmentFile = lib.optional (cfgA.environmentFile != null) cfgA.environmentFile;
          User = "nixfarm-agent";
          Group = "nixfarm-agent";
          StateDirectory = "nixfarm-agent";
          StateDirectoryMode = "0700";
          ReadWritePaths = [ "/nix/var/nix/daemon-socket" "/nix/var/nix/gcroots/per-user" ];
          TimeoutStopSec = cfgA.settings.drain_timeout_secs + 60;
          Restart = "on-failure";
        };
      };
    })
  ];
}
