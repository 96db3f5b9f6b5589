//! Unit tests of `config.rs`: defaults, unknown fields, ranges.
use super::*;

#[test]
fn defaults_and_unknown_fields() {
    let c: Config =
        toml::from_str("listen = \"0.0.0.0:1\"\n[scheduler]\nlease_secs = 5\n").unwrap();
    assert_eq!(c.listen, "0.0.0.0:1");
    assert_eq!(c.scheduler.lease_secs, 5);
    assert_eq!(c.scheduler.eval_chunk_size, 16);
    let err = toml::from_str::<Config>("lisen = \"x\"").unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}

#[test]
fn trusted_proxies_are_addresses_or_ranges_checked_at_load() {
    let c: Config =
        toml::from_str("[http]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1\"]\n")
            .unwrap();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let trusted = |a: &str| c.http.trusted_proxies.iter().any(|n| n.contains(&ip(a)));
    assert!(trusted("127.0.0.1") && trusted("10.9.8.7") && trusted("::1"));
    assert!(!trusted("127.0.0.2") && !trusted("192.0.2.1"));
    assert!(Config::default().http.trusted_proxies.is_empty());
    for bad in ["\"proxy.example\"", "\"10.0.0.0/33\"", "\"\""] {
        let err =
            toml::from_str::<Config>(&format!("[http]\ntrusted_proxies = [{bad}]\n")).unwrap_err();
        assert!(
            err.to_string().contains("is not an IP address"),
            "{bad}: {err}"
        );
    }
    let many = vec!["\"10.0.0.1\""; 65].join(", ");
    let err =
        toml::from_str::<Config>(&format!("[http]\ntrusted_proxies = [{many}]\n")).unwrap_err();
    assert!(err.to_string().contains("at most 64"), "{err}");
}

#[test]
fn revoking_certificates_without_client_certificates_is_refused() {
    let c: Config =
        toml::from_str("[tls]\nrevoked_certs_file = \"/etc/nixfarm/revoked\"\n").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("revoked_certs_file") && e.contains("client_ca_file"),
        "{e}"
    );
}

#[test]
fn listed_run_caches_and_keys_must_be_caches_and_keys() {
    let ok: Config = toml::from_str(
            "run_caches = [\"cachix://team\", \"https://c.example.org\"]\nrun_cache_keys = [\"team-1:AAAA\"]\n",
        )
        .unwrap();
    ok.validate().unwrap();
    for (toml, field) in [
        ("run_caches = [\"cachix:/team\"]", "run_caches"),
        ("run_cache_keys = [\"team-1 AAAA\"]", "run_cache_keys"),
    ] {
        let c: Config = toml::from_str(toml).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
}

#[test]
fn every_numeric_field_is_range_checked_with_its_name() {
    Config::default().validate().unwrap();
    for (toml, field) in [
        ("[scheduler]\nheartbeat_secs = 0", "heartbeat_secs"),
        ("[scheduler]\nlease_secs = 0", "lease_secs"),
        ("[scheduler]\nlease_secs = 15", "lease_secs"),
        ("[scheduler]\neval_chunk_size = 0", "eval_chunk_size"),
        ("[scheduler]\nmax_runs_in_flight = 0", "max_runs_in_flight"),
        ("[scheduler]\neval_memory_mib = 3", "eval_memory_mib"),
        ("[limits]\nsnapshot_max_bytes = 0", "snapshot_max_bytes"),
        (
            "[limits]\nsnapshot_max_bytes = 9999999999999",
            "snapshot_max_bytes",
        ),
        ("[limits]\nmax_message_bytes = 10", "max_message_bytes"),
        (
            "[limits]\nmax_uploads_per_client = 99",
            "max_uploads_per_client",
        ),
        ("[limits]\nupload_idle_secs = 0", "upload_idle_secs"),
    ] {
        let c: Config = toml::from_str(toml).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(" to "), "{toml}: {e}");
    }
}

#[test]
fn an_empty_token_file_is_an_error_not_open_doors() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("token");
    std::fs::write(&f, "  \n\t").unwrap();
    let e = read_secret(&f).unwrap_err().to_string();
    assert!(e.contains("is empty") && e.contains("token"), "{e}");
    std::fs::write(&f, "s3cret\n").unwrap();
    assert_eq!(read_secret(&f).unwrap(), "s3cret");
}
