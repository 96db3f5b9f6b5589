//! deploy/ is part of the product: its example configs parse with the real config types
//! (which refuse unknown fields), the units start the binaries with flags they accept, and
//! the NixOS module is valid Nix that exposes every field of the example configs.

use nixfarm_tests::*;

fn deploy(rel: &str) -> std::path::PathBuf {
    repo_root().join("deploy").join(rel)
}

#[test]
fn example_configs_parse_with_the_real_types() {
    let c =
        nixfarm_coordinator::Config::load(&deploy("coordinator.toml")).expect("coordinator.toml");
    assert_eq!(c.listen, "0.0.0.0:7420");
    assert_eq!(c.scheduler.lease_secs, 60);
    assert!(c.auth.agent_token_file.is_some());
    let a = nixfarm_agent::AgentConfig::load(&deploy("agent.toml")).expect("agent.toml");
    assert_eq!(a.max_jobs, 4);
    assert_eq!(a.coordinator, "https://farm.example.org:7420");
    // A typo is an error, not a silently ignored setting.
    let dir = scratch();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "listne = \"0.0.0.0:1\"\n").unwrap();
    let err = nixfarm_coordinator::Config::load(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("listne"), "{err}");
}

#[test]
fn units_use_flags_the_binaries_accept() {
    for (unit, binary) in [
        ("systemd/nixfarm-coordinator.service", "nixfarm-coordinator"),
        ("systemd/nixfarm-agent.service", "nixfarm-agent"),
    ] {
        let text = std::fs::read_to_string(deploy(unit)).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        assert!(exec.contains(binary));
        let help = stdout(
            &std::process::Command::new(bin(binary))
                .arg("--help")
                .output()
                .unwrap(),
        );
        for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(help.contains(flag), "{unit}: {binary} has no {flag}");
        }
        for hardening in [
            "ProtectSystem=strict",
            "StateDirectory=",
            "NoNewPrivileges=yes",
        ] {
            assert!(text.contains(hardening), "{unit} lacks {hardening}");
        }
    }
}

#[test]
fn the_nixos_module_parses_and_covers_every_config_field() {
    let module = deploy("nixos/module.nix");
    let out = std::process::Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&module)
        .output()
        .expect("nix-instantiate");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&module).unwrap();
    for file in ["coordinator.toml", "agent.toml"] {
        let cfg = std::fs::read_to_string(deploy(file)).unwrap();
        for key in cfg
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('['))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .filter(|k| !k.is_empty())
        {
            assert!(
                text.contains(key),
                "the module does not mention {key} of {file}"
            );
        }
    }
}

// ---- Container images: no container engine runs here, so the tests run what the images
// run: the binaries with the images' configs and ENTRYPOINT arguments.

#[path = "deploy/images.rs"]
mod images;

#[test]
fn systemd_analyze_security_rates_both_units_ok() {
    // Measured with systemd 252: the coordinator 1.1; the agent 2.2, for the namespaces it
    // isolates evaluations and smoke tests in. The margin is for other versions' weights.
    for (unit, threshold) in [
        ("nixfarm-agent.service", 2.6),
        ("nixfarm-coordinator.service", 1.5),
    ] {
        let out = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(deploy("systemd").join(unit))
            .output()
            .expect("systemd-analyze (Debian package systemd; scripts/setup installs it)");
        let (text, err) = (stdout(&out), stderr(&out));
        // A directive systemd does not know, or a value it cannot parse, is ignored with a
        // warning: the unit would run less sandboxed than it reads.
        assert!(
            !err.contains("ignoring") && !err.contains("Unknown"),
            "{unit}: {err}"
        );
        let score: f64 = text
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for "))
            .and_then(|(_, rest)| rest.split_once(": "))
            .and_then(|(_, s)| s.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no overall exposure level in:\n{text}\n{err}"));
        assert!(
            score <= threshold,
            "{unit}: exposure {score} > {threshold}:\n{text}"
        );
    }
}

#[test]
fn the_nixos_module_hardens_like_the_plain_units() {
    let module = std::fs::read_to_string(deploy("nixos/module.nix")).unwrap();
    let keys: Vec<&str> = module
        .lines()
        .skip_while(|l| l.trim() != "hardening = {")
        .skip(1)
        .take_while(|l| l.trim() != "};")
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .collect();
    assert!(keys.len() > 20, "the module's hardening block: {keys:?}");
    // What the agent's isolation needs, set in both (the module overrides the shared block).
    let unit = std::fs::read_to_string(deploy("systemd/nixfarm-agent.service")).unwrap();
    for (in_unit, in_module) in [
        (
            "RestrictNamespaces=user mnt pid net",
            r#"RestrictNamespaces = "user mnt pid net";"#,
        ),
        ("ProtectKernelTunables=no", "ProtectKernelTunables = false;"),
        ("ProtectKernelLogs=no", "ProtectKernelLogs = false;"),
        ("ProtectHostname=no", "ProtectHostname = false;"),
        (
            "SystemCallFilter=@mount capset",
            r#"++ [ "@mount" "capset" ]"#,
        ),
    ] {
        assert!(
            unit.lines().any(|l| l == in_unit),
            "the agent's unit lacks {in_unit}"
        );
        assert!(
            module.contains(in_module),
            "the NixOS module lacks {in_module}"
        );
    }
    for unit in [
        "systemd/nixfarm-coordinator.service",
        "systemd/nixfarm-agent.service",
    ] {
        let text = std::fs::read_to_string(deploy(unit)).unwrap();
        for k in &keys {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{k}="))),
                "{unit} lacks {k}= (the NixOS module sets it)"
            );
        }
    }
}
