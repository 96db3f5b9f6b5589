//! Parsing what Nix and Lix print when builds fail, from Nix 2.0 to today's Nix and Lix.
//!
//! The parsers are line-based and forgiving: indentation, an `error: ` prefix, ANSI colour
//! codes, timestamps before each line and extra lines (`likely URL:`, `expected path:`)
//! are all tolerated, because users run many versions and pipe logs through CI systems.

use crate::hash::{Algo, Hash};

/// A fixed-output hash mismatch, hashes in SRI form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashMismatch {
    /// The derivation (Nix ≥ 2.4) or output path (older Nix) the message names.
    pub path: String,
    pub specified: String,
    pub got: String,
}

/// Removes ANSI escape sequences (`\x1b[…m` and friends).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters, then one final byte in @..~.
                for n in chars.by_ref() {
                    if ('@'..='~').contains(&n) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The text after `key` on a line, if the line (past any prefix) has `key` as a word.
fn value_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let idx = line.find(key)?;
    let before = &line[..idx];
    // `key` must start a word: "got:" but not "forgot:".
    if before.chars().last().is_some_and(|c| c.is_alphanumeric()) {
        return None;
    }
    Some(line[idx + key.len()..].trim())
}

fn quoted(s: &str) -> Option<&str> {
    let start = s.find(['\'', '‘', '`', '"'])?;
    let rest = &s[start..];
    let open = rest.chars().next()?;
    let rest = &rest[open.len_utf8()..];
    let end = rest.find(['\'', '’', '`', '"'])?;
    Some(&rest[..end])
}

fn algo_of(s: &str) -> Option<Algo> {
    let s = s.trim();
    let name = s.split(['-', ':']).next()?;
    Algo::parse(name)
}

/// A mismatch whose two hashes are hashes of one algorithm, in SRI form; None for anything
/// else. What reads like a mismatch may be a builder's own output, and its "got" is written
/// into the user's files: text that is not a hash never passes.
fn mismatch(
    path: String,
    specified: &str,
    got: &str,
    specified_algo: Option<Algo>,
    got_algo: Option<Algo>,
) -> Option<HashMismatch> {
    let specified = Hash::parse(specified, specified_algo)?;
    let got = Hash::parse(got, got_algo)?;
    (specified.algo == got.algo).then(|| HashMismatch {
        path,
        specified: specified.to_sri(),
        got: got.to_sri(),
    })
}

/// Every fixed-output hash mismatch reported in a log, in order; only those that name two
/// hashes of one algorithm.
pub fn parse_hash_mismatches(log: &str) -> Vec<HashMismatch> {
    let clean = strip_ansi(log);
    let lines: Vec<&str> = clean.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(idx) = line.find("hash mismatch in fixed-output derivation") {
            let path = quoted(&line[idx..]).unwrap_or_default().to_string();
            let mut specified = None;
            let mut got = None;
            let mut j = i + 1;
            // The values follow within a few lines (Lix puts `likely URL:` first).
            while j < lines.len() && j <= i + 8 {
                let l = lines[j];
                if l.contains("hash mismatch in fixed-output derivation") {
                    break;
                }
                if specified.is_none() {
                    specified = value_after(l, "specified:").or_else(|| value_after(l, "wanted:"));
                }
                if got.is_none() {
                    got = value_after(l, "got:");
                }
                if specified.is_some() && got.is_some() {
                    break;
                }
                j += 1;
            }
            if let (Some(s), Some(g)) = (specified, got) {
                let algo = algo_of(s);
                if let Some(m) = mismatch(path, s, g, algo, algo.or(algo_of(g))) {
                    out.push(m);
                }
                i = j;
            }
        } else if let Some(idx) = line.find("fixed-output derivation produced path") {
            // Nix 2.0–2.1: "… produced path 'P' with sha256 hash 'GOT' instead of the expected hash 'WANTED'"
            let rest = &line[idx..];
            let path = quoted(rest).unwrap_or_default().to_string();
            let algo = rest
                .split_whitespace()
                .skip_while(|w| *w != "with")
                .nth(1)
                .and_then(Algo::parse);
            let got = rest.find(" hash ").and_then(|k| quoted(&rest[k..]));
            let wanted = rest.find("expected hash").and_then(|k| quoted(&rest[k..]));
            if let (Some(g), Some(w)) = (got, wanted)
                && let Some(m) = mismatch(path, w, g, algo, algo)
            {
                out.push(m);
            }
        }
        i += 1;
    }
    out
}

/// [`classify_failure`] for a build whose Nix error (`nix_error`, what the daemon reported)
/// is known apart from the builder's log: a hash mismatch counts only when Nix itself said
/// it. The log holds whatever the builder printed, look-alike mismatches included.
pub fn classify_nix_failure(exit_code: Option<i32>, log: &str, nix_error: &str) -> Failure {
    if let Some(m) = parse_hash_mismatches(nix_error).into_iter().next() {
        return Failure::HashMismatch(m);
    }
    // Whatever else the log says (a timeout, a full disk), as before, but no mismatch.
    classify(exit_code, log)
}

/// What a failed build attempt was, as far as Nix's output and exit code tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    HashMismatch(HashMismatch),
    TimedOut(String),
    /// The builder ran and failed (or an input it needed did).
    BuildFailed(String),
    /// Nix itself, the store or the machine broke: worth retrying elsewhere.
    Infra(String),
    /// The machine ran out of disk space (ENOSPC) while building: retry elsewhere, and give
    /// this machine no more work until it has room.
    DiskFull(String),
    /// A check (`--check`) built the derivation again and got different outputs ("may not
    /// be deterministic": every Nix and Lix word it so).
    NotDeterministic(String),
}

/// Whether an error Nix printed is about the machine or the store (busy database, full disk,
/// no memory, no daemon) rather than about what it was asked to evaluate or build: such an
/// error is worth retrying, elsewhere if need be, and says nothing about the package.
pub fn is_machine_error(message: &str) -> bool {
    is_disk_full(message) || is_machine_error_but_disk(message)
}

/// [`is_machine_error`] for anything but a full disk (whose words anyone can print: see
/// [`crate::room`]).
pub fn is_machine_error_but_disk(message: &str) -> bool {
    const MARKS: &[&str] = &[
        "database is locked",
        "Too many open files",
        "Cannot allocate memory",
        "out of memory",
        "std::bad_alloc",
        "cannot connect to socket",
        "opening lock file",
    ];
    (message.contains("SQLite database") && message.contains("is busy"))
        || is_transfer_error(message)
        || MARKS.iter().any(|m| message.contains(m))
        // Nix's own state (its database, GC roots, profiles), e.g. two processes racing to
        // set up a fresh store: "creating symlink from '/nix/var/nix/gcroots/profiles' …:
        // File exists".
        || message.contains("'/nix/var/nix/")
}

/// Whether `message`, Nix's words for a failing machine, may be an expression's own (an
/// `abort` worded so, which `tryEval` cannot catch), to be weighed against other attributes
/// evaluated on the same machine: the store's state (a lock, its database, the daemon's
/// socket). Not a failed download, a full disk, memory or file descriptors
/// running out: those depend on the moment or on the attribute's size, so they stay the
/// machine's.
pub fn is_machine_error_to_weigh(message: &str) -> bool {
    // Memory and file descriptors run out for a large attribute where a small one fits.
    const SIZED: &[&str] = &[
        "Cannot allocate memory",
        "out of memory",
        "std::bad_alloc",
        "Too many open files",
    ];
    is_machine_error_but_disk(message)
        && !is_transfer_error(message)
        && !SIZED.iter().any(|m| message.contains(m))
}

/// Whether a download Nix made failed in transport or at the server (every version prints
/// `unable to download '<url>': <curl's words> (<code>)` or `… HTTP error <status>`): name
/// resolution, connection, timeout, TLS, a cut transfer, a 5xx or 429. A 401, 403 or 404 is
/// the reference's fault, and stays the user's.
pub fn is_transfer_error(message: &str) -> bool {
    const CURL: &[&str] = &[
        "Couldn't resolve host name",
        "Could not resolve host",
        "Couldn't resolve proxy name",
        "Couldn't connect to server",
        "Could not connect to server",
        "Timeout was reached",
        "Operation timed out",
        "SSL connect error",
        "Failure when receiving data from the peer",
        "Failed sending data to the peer",
        "Server returned nothing (no headers, no data)",
        "Recv failure",
        "Connection reset by peer",
        "Connection refused",
    ];
    message.lines().any(|l| {
        (l.contains("unable to download") || l.contains("error: cannot download"))
            && (CURL.iter().any(|c| l.contains(c))
                || ["HTTP error 5", "HTTP error 429"]
                    .iter()
                    .any(|h| l.contains(h)))
    })
}

/// Whether a line is Nix saying the derivation cannot be built on this machine at all (its
/// system or required features): 2.8–2.29 `a 'aarch64-linux' with features {} is required to
/// build '…', but I am a 'x86_64-linux'`; 2.30+ `Reason: required system or feature not
/// available`, 2.34 `platform mismatch` / `missing system features`. The machine's fault,
/// whichever verdict the version gives with it.
fn is_wrong_machine(l: &str) -> bool {
    (l.contains("is required to build") && l.contains("but I am a"))
        || l.contains("required system or feature not available")
        || l.contains("Reason: platform mismatch")
        || l.contains("Reason: missing system features")
}

/// Whether a line is Nix saying an input's substitutes failed (the cache could not be read
/// to the end): the derivation never ran, and another try, here or elsewhere, may work.
fn is_substitution_failure(l: &str) -> bool {
    l.contains("some substitutes for the outputs of derivation") && l.contains("failed")
}

/// Whether an error (or a log line) says the disk is full: ENOSPC or EDQUOT.
pub fn is_disk_full(message: &str) -> bool {
    message.contains("No space left on device") || message.contains("Disk quota exceeded")
}

/// Classifies a failed `nix-store --realise` from its exit code and log, in which the
/// builder's output and Nix's own messages are mixed. What a builder can print, it can
/// forge; so where the exit code is Nix's build verdict (100–111: 0x60 plus 0x01 timed out,
/// 0x02 hash mismatch, 0x08 not deterministic) that verdict decides the kind, and the text
/// is read from Nix's own message, the last of its kind (Nix prints it once the builder has
/// exited and its output is hashed).
pub fn classify_failure(exit_code: Option<i32>, log: &str) -> Failure {
    // Only Nix sets this bit: a look-alike message under another verdict is the builder's.
    if matches!(exit_code, Some(c @ 100..=111) if c & 0x02 != 0)
        && let Some(m) = parse_hash_mismatches(log).pop()
    {
        return Failure::HashMismatch(m);
    }
    classify(exit_code, log)
}

/// Whether Nix's verdict says the failure is of the kind `bit` stands for. Nix gives a timeout
/// or a `--check` difference no other exit code (nix-store's, or the daemon's status read as
/// one); a fixed-output builder that fails is a transient failure, exit 1, and fetchers print
/// "Operation timed out after …" when theirs do.
fn verdict(exit_code: Option<i32>, bit: i32) -> bool {
    matches!(exit_code, Some(c @ 100..=111) if c & bit != 0)
}

/// A failure that is no hash mismatch, from its exit code and log.
fn classify(exit_code: Option<i32>, log: &str) -> Failure {
    let clean = strip_ansi(log);
    if verdict(exit_code, 0x01)
        && let Some(l) = clean.lines().rfind(|l| l.contains("timed out after"))
    {
        return Failure::TimedOut(trim_error(l));
    }
    if verdict(exit_code, 0x08)
        && let Some(l) = clean
            .lines()
            .rfind(|l| l.contains("may not be deterministic: output"))
    {
        return Failure::NotDeterministic(trim_error(l));
    }
    // nix-store: 0x60 | 0x04 permanent | 0x01 timeout | 0x02 hash mismatch.
    if let Some(code) = exit_code
        && (100..=111).contains(&code)
        && code & 0x01 != 0
    {
        return Failure::TimedOut(first_error(&clean).unwrap_or_else(|| "build timed out".into()));
    }
    // Whoever hit it (the builder, Nix writing the output or its database), a full disk is
    // the machine's fault, not the package's.
    if let Some(l) = clean.lines().find(|l| is_disk_full(l)) {
        return Failure::DiskFull(trim_error(l.trim_start_matches(['>', ' '])));
    }
    // Nix's verdicts on the machine, not the package: this machine cannot build it, or an
    // input could not be fetched from the cache (the dependency "failed" with it).
    if let Some(l) = clean
        .lines()
        .find(|l| is_wrong_machine(l) || is_substitution_failure(l))
    {
        return Failure::Infra(trim_error(l));
    }
    let builder_failed = clean.lines().find(|l| {
        l.contains("builder for") && l.contains("failed")
            || l.contains("Cannot build")
            || l.contains("Reason: builder failed")
            || l.contains("dependencies of derivation")
            || l.contains("dependency failed")
    });
    if let Some(l) = builder_failed {
        return Failure::BuildFailed(trim_error(l));
    }
    if matches!(exit_code, Some(100..=111)) {
        return Failure::BuildFailed(first_error(&clean).unwrap_or_else(|| "build failed".into()));
    }
    Failure::Infra(first_error(&clean).unwrap_or_else(|| match exit_code {
        Some(c) => format!("nix exited with code {c}"),
        None => "nix was killed by a signal".into(),
    }))
}

/// Nix itself aborting on a failed assertion (SIGABRT) while it builds: Nix 2.8 does so for
/// a fixed-output derivation whose output refers to a store path (later versions say
/// `illegal path references in fixed-output derivation`). The derivation's own doing, the
/// same on any machine: reported as its failure, not retried as the machine's.
pub fn aborted(signal: Option<i32>, log: &str) -> Option<Failure> {
    const SIGABRT: i32 = 6;
    if signal != Some(SIGABRT) {
        return None;
    }
    let l = strip_ansi(log)
        .lines()
        .rfind(|l| l.contains("Assertion") && l.contains("failed"))?
        .trim()
        .to_string();
    Some(Failure::BuildFailed(format!(
        "Nix aborted building it ({}): with Nix 2.8 a fixed-output derivation whose output refers to a store path does this",
        crate::messages::clip_line(&l, 300)
    )))
}

fn clip_line(l: &str, max: usize) -> &str {
    match l.char_indices().nth(max) {
        Some((i, _)) => &l[..i],
        None => l,
    }
}

fn trim_error(l: &str) -> String {
    let l = l.trim();
    l.strip_prefix("error:")
        .unwrap_or(l)
        .trim()
        .trim_end_matches(';')
        .to_string()
}

/// Most continuation lines of an error message kept, and the most bytes it grows to with
/// them: a throw of a joined list, or a module conflict naming hundreds of definitions,
/// stays a reason.
const CONTINUATION_LINES: usize = 20;
const CONTINUATION_BYTES: usize = 2000;

/// The first `error:` message in a log, with its continuation lines, for reports.
pub fn first_error(log: &str) -> Option<String> {
    let clean = strip_ansi(log);
    let lines: Vec<&str> = clean.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().starts_with("error:"))?;
    let mut msg = trim_error(lines[start]);
    let mut at = start;
    // Nix ≥ 2.4 nests the real cause below "… while evaluating": keep the last error line.
    let mut last_error = None;
    for (i, l) in lines.iter().enumerate().skip(start + 1) {
        let t = l.trim();
        if let Some(e) = t.strip_prefix("error:") {
            last_error = Some((i, e.trim().to_string()));
        }
    }
    if let Some((i, e)) = last_error.filter(|(_, e)| !e.is_empty()) {
        msg = e;
        at = i;
    }
    if !msg.is_empty() {
        // A message of several lines (`throw "a\nb"`) goes on indented below its first,
        // up to a blank line or what Nix adds after it (a trace, a place, a build's log,
        // 2.29's "Reason:" and "Output paths:"), and no further than a reason is read.
        for (kept, l) in lines[at + 1..].iter().enumerate() {
            let t = l.trim();
            let lower = t.to_ascii_lowercase();
            let nix_own = [
                "…",
                "at ",
                "error:",
                "> ",
                "for full logs",
                "reason:",
                "output paths:",
            ]
            .iter()
            .any(|p| lower.starts_with(p))
                || (lower.starts_with("last ") && lower.ends_with("log lines:"));
            if t.is_empty() || nix_own || !l.starts_with(char::is_whitespace) {
                break;
            }
            if kept == CONTINUATION_LINES || msg.len() + t.len() > CONTINUATION_BYTES {
                msg.push_str("\n…");
                break;
            }
            msg.push('\n');
            msg.push_str(t);
        }
    } else {
        msg = lines[start + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string();
    }
    Some(msg)
}

/// Where Nix says the error [`first_error`] reads happened: the first `at FILE:LINE:COL:`
/// line after that error's line (Nix ≥ 2.4 prints it for syntax, type and recursion errors;
/// a `throw` shows none without `--show-trace`), as `FILE:LINE:COL`. A file in a store path
/// is named relative to that path (`/nix/store/…-source/flake.nix` is `flake.nix`): the
/// checkout's files are where they are in the repository. A place that is no file
/// (`«string»`: nixfarm's own expression around the package) is none.
pub fn error_position(log: &str) -> Option<String> {
    let clean = strip_ansi(log);
    let lines: Vec<&str> = clean.lines().collect();
    let last_error = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("error:"))?;
    // Its own place is the first `at` line after it: a later one is another frame's.
    let at = lines[last_error + 1..]
        .iter()
        .map(|l| l.trim())
        .take_while(|l| !l.starts_with("error:") && !l.starts_with('…'))
        .find(|l| l.starts_with("at "))?;
    let at = at.strip_prefix("at ")?.strip_suffix(':')?;
    let (rest, col) = at.rsplit_once(':')?;
    let (file, line) = rest.rsplit_once(':')?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !numeric(line) || !numeric(col) || !file.starts_with('/') {
        return None;
    }
    // In the store, relative to the store path (a flake's own files, or an input's); an
    // unpacked snapshot's (a `--file` entry), relative to it: an agent's own directories
    // are not the repository's.
    let file = match file.strip_prefix("/nix/store/") {
        Some(in_store) => in_store.split_once('/').map_or(file, |(_, rel)| rel),
        None => match file.rsplit_once("/sources/") {
            Some((_, snapshot)) => snapshot.split_once('/').map_or(file, |(_, rel)| rel),
            None => file,
        },
    };
    // A long path keeps its end: the file's name.
    let file = match file.char_indices().rev().nth(199) {
        Some((i, _)) => format!("…{}", &file[i..]),
        None => file.to_string(),
    };
    Some(format!("{file}:{line}:{col}"))
}

/// Parses `nix --version` output ("nix (Nix) 2.8.0", "nix (Lix, like Nix) 2.91.1").
pub fn parse_version(s: &str) -> Option<(u32, u32)> {
    let v = s.split_whitespace().last()?;
    let mut parts = v.split(['.', 'p', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Converts a single hash in any spelling to SRI, guessing sha256 for bare digests.
pub fn hash_to_sri(s: &str) -> String {
    Hash::parse(s, Some(Algo::Sha256))
        .map(|h| h.to_sri())
        .unwrap_or_else(|| s.to_string())
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
