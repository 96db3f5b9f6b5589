//! Unit tests of `runner.rs`.
use super::*;

#[test]
fn a_cache_without_keys_is_no_substituter() {
    let settings = |keys: &[&str]| {
        Nix::default().build_settings(&BuildOptions {
            substituter: "https://cache.example".into(),
            trusted_public_keys: keys.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        })
    };
    let get =
        |s: &[(String, String)], k: &str| s.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let none = settings(&[]);
    assert_eq!(get(&none, "substituters").as_deref(), Some(""));
    assert_eq!(get(&none, "require-sigs"), None, "{none:?}");
    let signed = settings(&["c-1:AAAA"]);
    assert_eq!(
        get(&signed, "substituters").as_deref(),
        Some("https://cache.example")
    );
    assert_eq!(
        get(&signed, "trusted-public-keys").as_deref(),
        Some("c-1:AAAA")
    );
    assert_eq!(get(&signed, "require-sigs"), None);
}

#[test]
fn a_ca_file_reaches_nix_through_its_environment_as_well() {
    use std::ffi::OsStr;
    let mut c = Command::new("nix-store");
    apply_settings(
        &mut c,
        [
            ("netrc-file", OsStr::new("/w/netrc")),
            ("ssl-cert-file", OsStr::new("/w/ca.pem")),
        ],
    );
    let c = c.as_std();
    let args: Vec<&OsStr> = c.get_args().collect();
    assert_eq!(
        args,
        [
            "--option",
            "netrc-file",
            "/w/netrc",
            "--option",
            "ssl-cert-file",
            "/w/ca.pem"
        ]
    );
    let env: Vec<_> = c.get_envs().collect();
    assert_eq!(
        env,
        [(
            OsStr::new("NIX_SSL_CERT_FILE"),
            Some(OsStr::new("/w/ca.pem"))
        )]
    );
}

#[test]
fn nix_strings_escape_interpolation() {
    assert_eq!(nix_string("a\"b${c}\\"), "\"a\\\"b\\${c}\\\\\"");
    assert_eq!(fragment("packages.x86_64-linux"), "packages.x86_64-linux");
    assert_eq!(
        fragment("legacyPackages.x86_64-linux.a b"),
        "legacyPackages.x86_64-linux.\"a b\""
    );
}

#[test]
fn tail_keeps_whole_lines() {
    assert_eq!(tail("abc", 10), "abc");
    assert_eq!(tail("line1\nline2\nline3", 8), "line3");
    let mut t = TailBuffer::new(4);
    for _ in 0..10 {
        t.push(b"abc");
    }
    assert_eq!(t.text(), "cabc");
}
