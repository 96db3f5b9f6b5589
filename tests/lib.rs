//! Harness for nixfarm's end-to-end tests: starts the real binaries (coordinator, agents in
//! their own Nix stores, the CLI) against real Nix, on loopback.

#[path = "cachix_server.rs"]
pub mod cachix_server;

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where cargo put the binaries (target/<profile>/), found from this test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --bins` first",
        p.display()
    );
    p
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

pub fn example_repo() -> PathBuf {
    repo_root().join("examples/atproto-pkgs")
}

/// What the example's files are named by in reports when it is run in place: a flake in a
/// subdirectory of a git repository is read with the whole repository (as `nix build ./sub`
/// reads it), so its paths carry that subdirectory (`examples/atproto-pkgs/`); none out of
/// git (a CI checkout from a tarball, say).
pub fn example_prefix() -> String {
    Command::new("git")
        .arg("-C")
        .arg(example_repo())
        .args(["rev-parse", "--show-prefix"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Expected statuses of the example repository, as the fixture documents them.
pub fn expected() -> serde_json::Value {
    let text =
        std::fs::read_to_string(example_repo().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

/// A scratch directory that every Nix build user can enter (mode 755).
pub fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("nixfarm-e2e-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    set_mode(d.path(), 0o755);
    d
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Sends SIGTERM (drain) and waits up to `d`.
    pub fn terminate(&mut self, d: Duration) {
        unsafe_kill(self.child.id(), 15);
        let start = Instant::now();
        while start.elapsed() < d {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What agents that pushed a run's outputs to a cache must have done, read from their logs
/// (started with `RUST_LOG=info,nixfarm_nix::daemon=debug`): each push claimed its paths for
/// its attempt (none was refused and went ahead without a claim), and builds took the Nix
/// daemons started for them while the run evaluated, with the settings they then asked for.
pub fn assert_agents_claimed_and_took_daemons_ahead(agents: &[Proc]) {
    for a in agents {
        let log = a.log_text();
        assert!(!log.contains("uploading without a claim"), "{log}");
    }
    let logs: String = agents.iter().map(|a| a.log_text()).collect();
    assert!(
        logs.contains("a build takes a daemon started ahead of it"),
        "{logs}"
    );
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A running coordinator binary.
pub struct Coordinator {
    pub proc: Proc,
    pub url: String,
    pub state_dir: PathBuf,
}

impl Coordinator {
    pub fn start(state_dir: &Path) -> anyhow::Result<Coordinator> {
        Self::start_on(state_dir, "127.0.0.1:0", &[])
    }

    /// A coordinator whose config file (written beside its state) is `config`.
    pub fn start_with_config(dir: &Path, config: &str) -> anyhow::Result<Coordinator> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("coordinator.toml");
        std::fs::write(&file, config)?;
        Self::start_on(
            &dir.join("coordinator"),
            "127.0.0.1:0",
            &["--config", &file.to_string_lossy()],
        )
    }

    pub fn start_on(state_dir: &Path, listen: &str, extra: &[&str]) -> anyhow::Result<Coordinator> {
        std::fs::create_dir_all(state_dir)?;
        let log = state_dir.join(format!("coordinator-{}.log", fastrand_u32()));
        let mut child = Command::new(bin("nixfarm-coordinator"))
            .args(["--listen", listen, "--state-dir"])
            .arg(state_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start coordinator")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!(
                "coordinator did not start: {line}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Coordinator {
            url: format!("http://{addr}"),
            proc: Proc {
                child,
                name: "coordinator".into(),
                log,
            },
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// The coordinator's database, read-only (for checking its records).
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.state_dir.join("coordinator.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open coordinator db")
    }
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// An agent process on its own "host": its own mount namespace with its own /nix, its own
/// home directory, sharing nothing with the others but the coordinator and the cache.
pub struct Host {
    pub root: PathBuf,
    /// The network namespace the host lives in (None: this machine's own network).
    pub netns: Option<String>,
    /// A store on a file system of this many MiB (None: the size of /tmp's).
    pub store_mib: Option<u64>,
    /// The UID (and GID) its agents run as, owning its store (None: root).
    pub user: Option<u32>,
}

/// A network namespace joined to this machine's by a veth pair: a host whose link can be
/// cut. The machine's end is `host_ip`, the namespace's end `ns_ip`. Removed when dropped.
pub struct NetNs {
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
    veth: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new() -> NetNs {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id() % 10_000;
        // Addresses of this test's own hosts only: a /30 inside 10.231.0.0/16.
        let subnet = (id * 4 + n) % 16_000;
        let (a, b) = (subnet / 64, (subnet % 64) * 4);
        let ns = NetNs {
            name: format!("nixfarm-{id}-{n}"),
            host_ip: format!("10.231.{a}.{}", b + 1),
            ns_ip: format!("10.231.{a}.{}", b + 2),
            veth: format!("nfh{id}x{n}"),
        };
        let peer = format!("nfa{id}x{n}");
        // Leftovers of a killed earlier run with the same numbers would refuse the names.
        let _ = Command::new("ip").args(["link", "del", &ns.veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.veth,
        ]);
        ip(&["link", "set", &ns.veth, "up"]);
        let cidr = format!("{}/30", ns.ns_ip);
        for args in [
            ["addr", "add", cidr.as_str(), "dev", peer.as_str()].as_slice(),
            &["link", "set", &peer, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", &ns.name, "ip"];
            full.extend_from_slice(args);
            ip(&full);
        }
        ns
    }

    /// Cuts the link: packets stop in both directions; connections stay open, as in a
    /// real network outage.
    pub fn cut(&self) {
        ip(&["link", "set", &self.veth, "down"]);
    }

    pub fn restore(&self) {
        ip(&["link", "set", &self.veth, "up"]);
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Host {
    pub fn new(root: &Path) -> Host {
        for d in ["nix", "home", "work"] {
            std::fs::create_dir_all(root.join(d)).expect("host dirs");
        }
        set_mode(root, 0o755);
        set_mode(&root.join("nix"), 0o755);
        Host {
            root: root.to_path_buf(),
            netns: None,
            store_mib: None,
            user: None,
        }
    }

    /// A host whose agents run as `uid` (and the group of that number) without any
    /// privilege, as the shipped units run them, over a store of their own.
    pub fn unprivileged(root: &Path, uid: u32) -> Host {
        let host = Host::new(root);
        for d in ["nix", "home", "work"] {
            std::os::unix::fs::chown(root.join(d), Some(uid), Some(uid)).expect("chown");
        }
        Host {
            user: Some(uid),
            ..host
        }
    }

    /// A host whose /nix is a file system of `mib` MiB: its disk fills up.
    pub fn with_small_disk(root: &Path, mib: u64) -> Host {
        Host {
            store_mib: Some(mib),
            ..Host::new(root)
        }
    }

    /// A host on a network of its own (see [`NetNs`]).
    pub fn in_netns(root: &Path, netns: &NetNs) -> Host {
        Host {
            netns: Some(netns.name.clone()),
            ..Host::new(root)
        }
    }

    /// A command that runs `argv` inside this host's mount namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut script = match self.store_mib {
            Some(mib) => format!(
                "set -e; mount -t tmpfs -o size={mib}m,mode=755 nixfarm-small-disk /nix; exec \"$@\""
            ),
            None => String::from("set -e; mount --bind \"$NF_HOST/nix\" /nix; exec \"$@\""),
        };
        if let Some(uid) = self.user {
            script = script.replace(
                "exec \"$@\"",
                &format!("exec setpriv --reuid={uid} --regid={uid} --clear-groups -- \"$@\""),
            );
        }
        script.push('\n');
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        c.args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "host",
        ]);
        c.args(argv);
        c.env("NF_HOST", &self.root)
            .env("HOME", self.root.join("home"))
            .env("XDG_CACHE_HOME", self.root.join("home/.cache"))
            // Simulated hosts share this machine's nixbld UIDs but not their stores' user
            // lock pools, so two Nix instances would both take nixbld1 and kill each other's
            // builder (Nix kills a build user's processes before use). Real hosts do not share
            // UIDs; here each host builds as root instead (the sandbox is off either way).
            .env(
                "NIX_CONFIG",
                "substituters = \nexperimental-features = nix-command flakes\nbuild-users-group = ",
            );
        c
    }

    pub fn start_agent(
        &self,
        name: &str,
        coordinator: &str,
        signing_key: Option<&Path>,
        max_jobs: u32,
    ) -> anyhow::Result<Proc> {
        self.start_agent_with_env(name, coordinator, signing_key, max_jobs, &[])
    }

    /// Like `start_agent`, with extra environment (cache credentials).
    pub fn start_agent_with_env(
        &self,
        name: &str,
        coordinator: &str,
        signing_key: Option<&Path>,
        max_jobs: u32,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        self.start_agent_with(name, coordinator, signing_key, max_jobs, env, &[])
    }

    /// Like `start_agent_with_env`, with extra agent flags.
    pub fn start_agent_with(
        &self,
        name: &str,
        coordinator: &str,
        signing_key: Option<&Path>,
        max_jobs: u32,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> anyhow::Result<Proc> {
        let agent = bin("nixfarm-agent");
        let work = self.root.join("work");
        let mut argv: Vec<String> = vec![
            agent.display().to_string(),
            "--coordinator".into(),
            coordinator.into(),
            "--name".into(),
            name.into(),
            "--max-jobs".into(),
            max_jobs.to_string(),
            "--work-dir".into(),
            work.display().to_string(),
        ];
        if let Some(k) = signing_key {
            argv.push("--signing-key-file".into());
            argv.push(k.display().to_string());
        }
        argv.extend(flags.iter().map(|f| f.to_string()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let log = self.root.join(format!("{name}.log"));
        let child = self
            .command(&refs)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start agent")?;
        Ok(Proc {
            child,
            name: name.into(),
            log,
        })
    }

    /// Runs a command in this host and returns its output.
    pub fn run(&self, argv: &[&str]) -> Output {
        self.command(argv).output().expect("run in host")
    }

    /// Whether a store path is valid in this host's store.
    pub fn has_path(&self, path: &str) -> bool {
        self.run(&["nix-store", "--check-validity", path])
            .status
            .success()
    }
}

/// A signing key pair for a binary cache: (secret key file, public key).
pub fn cache_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let sk = dir.join("cache.sk");
    let pk = dir.join("cache.pk");
    let st = Command::new("nix-store")
        .args(["--generate-binary-cache-key", name])
        .arg(&sk)
        .arg(&pk)
        .status()
        .expect("nix-store --generate-binary-cache-key");
    assert!(st.success());
    set_mode(&sk, 0o644);
    (
        sk,
        std::fs::read_to_string(&pk)
            .expect("public key")
            .trim()
            .to_string(),
    )
}

/// Runs the CLI against a coordinator.
pub fn cli(coordinator: &str, args: &[&str]) -> Output {
    Command::new(bin("nixfarm"))
        .args(args)
        .env("NIXFARM_COORDINATOR", coordinator)
        .stdin(Stdio::null())
        .output()
        .expect("run nixfarm")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies a directory tree (for fixtures that a test modifies).
pub fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

/// Packages of a JSON report by attribute.
pub fn packages_by_attr(
    report: &serde_json::Value,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    report["packages"]
        .as_array()
        .expect("packages array")
        .iter()
        .map(|p| (p["attr"].as_str().expect("attr").to_string(), p.clone()))
        .collect()
}

/// Polls `nixfarm report RUN --format json` until the run is in `state`; returns the report.
pub fn wait_for_state(
    coordinator: &str,
    run: &str,
    state: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_for(timeout, &format!("run {run} to be {state}"), || {
        let r: serde_json::Value = serde_json::from_str(&stdout(&cli(
            coordinator,
            &["report", run, "--format", "json"],
        )))
        .ok()?;
        // Ended otherwise: waiting longer would only hide why.
        let ended = ["finished", "failed", "cancelled"].contains(&r["state"].as_str()?);
        assert!(
            r["state"] == state || !ended,
            "run {run} ended {} instead of {state}: {r}",
            r["state"]
        );
        (r["state"] == state).then_some(r)
    })
}

/// A fresh, empty store (a host of its own) substitutes every output of `packages` from the
/// cache at `uri`, with signatures required and only `public_key` trusted.
pub fn substitute_into_fresh_store(
    root: &std::path::Path,
    packages: &[&serde_json::Value],
    uri: &str,
    public_key: &str,
) {
    let fresh = Host::new(root);
    for p in packages {
        for (_, path) in p["outputs"].as_object().unwrap() {
            let out = fresh.run(&[
                "nix-store",
                "--realise",
                path.as_str().unwrap(),
                "--option",
                "substituters",
                uri,
                "--option",
                "trusted-public-keys",
                public_key,
                "--option",
                "require-sigs",
                "true",
            ]);
            assert!(out.status.success(), "{}: {}", p["attr"], stderr(&out));
        }
    }
}

/// nginx (`scripts/setup` installs Debian's) on 127.0.0.1, its one server block holding
/// `locations`; stopped when the returned process is dropped. One process (no master): a
/// killed master leaves its workers behind. Returns it and its port.
pub fn start_nginx(dir: &Path, locations: &str) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    for sub in ["tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"daemon off;
master_process off;
user root;
pid {d}/nginx.pid;
error_log {d}/logs/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {d}/logs/access.log;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port};
{locations}  }}
}}
"#
        ),
    )
    .unwrap();
    let log = dir.join("logs/stderr.log");
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("nginx (scripts/setup installs it)");
    let proc = Proc {
        child,
        name: "nginx".into(),
        log,
    };
    wait_for(Duration::from_secs(10), "nginx to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    });
    (proc, port)
}

/// A flake `name` under `dir` whose packages are `body` (Nix bindings), with `mk NAME
/// SCRIPT` at hand: a derivation running SCRIPT with /bin/sh.
pub fn sh_flake(dir: &Path, name: &str, body: &str) -> PathBuf {
    let repo = dir.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
      mk = name: script: derivation {{ inherit name; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" script ]; }};
    in {{ packages.x86_64-linux = {{
{body}
    }}; }}; }}"#
        ),
    )
    .unwrap();
    repo
}

/// A flake in `dir/repo` of two packages: `stable`, whose output is the same whoever builds
/// it, and `stamp`, which writes the time into its output (not reproducible).
pub fn stable_and_stamp_repo(dir: &Path) -> PathBuf {
    sh_flake(
        dir,
        "repo",
        r#"      stable = mk "stable" "echo stable > $out";
      stamp = mk "stamp" "date +%s%N > $out";"#,
    )
}

/// A run of [`stable_and_stamp_repo`] with cross-checked builds ended as it should:
/// `stable` ready, `stamp` not reproducible, its reason naming the difference Nix found.
pub fn assert_stamp_not_reproducible(report: &serde_json::Value) {
    assert_stamp_differs(report, "may not be deterministic");
}

/// [`assert_stamp_not_reproducible`], with what the reason says of the difference (Nix's
/// `--check`, or the two builds' NAR hashes).
pub fn assert_stamp_differs(report: &serde_json::Value, how: &str) {
    let by = packages_by_attr(report);
    assert_eq!(by["stable"]["status"], "ready", "{report}");
    assert_eq!(by["stamp"]["status"], "not-reproducible", "{report}");
    let reason = by["stamp"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("built different outputs") && reason.contains(how),
        "{reason}"
    );
}

/// The farm cache's address, from the coordinator's log.
pub fn farm_cache_addr(c: &Coordinator) -> String {
    wait_for(Duration::from_secs(10), "the farm cache to listen", || {
        c.proc.log_text().lines().find_map(|l| {
            l.contains("farm cache listening")
                .then(|| {
                    l.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()
                        .map(String::from)
                })
                .flatten()
        })
    })
}

/// One raw HTTP/1.1 request (`Connection: close`); returns the whole response.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    json: Option<&str>,
) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let body = json
        .map(|j| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{j}",
                j.len()
            )
        })
        .unwrap_or_else(|| "\r\n".into());
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n{body}"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One GET; returns the status line.
pub fn http_get(addr: &str, path: &str, auth: Option<&str>) -> String {
    let out = http(addr, "GET", path, auth, None);
    out.lines().next().unwrap_or_default().to_string()
}

/// One raw HTTP/1.1 PUT of `body`; returns the status line and the body of the answer.
pub fn http_put(addr: &str, path: &str, auth: Option<&str>, body: &[u8]) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// Uploads `nar` to a cache that takes HTTP PUTs (the farm cache) as the store path `path`,
/// with no references: the NAR uncompressed, then its narinfo. Returns the status line and
/// body of the narinfo's answer.
pub fn upload_nar(addr: &str, auth: Option<&str>, path: &str, nar: &[u8]) -> (String, String) {
    use sha2::Digest as _;
    let hash = nixfarm_nix::hash::nix32_encode(&sha2::Sha256::digest(nar));
    let (status, body) = http_put(addr, &format!("/nar/{hash}.nar"), auth, nar);
    assert!(status.contains(" 200 "), "{status} {body}");
    let store_hash = &path["/nix/store/".len()..][..32];
    let narinfo = format!(
        "StorePath: {path}\nURL: nar/{hash}.nar\nCompression: none\nFileHash: sha256:{hash}\nFileSize: {n}\nNarHash: sha256:{hash}\nNarSize: {n}\nReferences: \n",
        n = nar.len()
    );
    http_put(
        addr,
        &format!("/{store_hash}.narinfo"),
        auth,
        narinfo.as_bytes(),
    )
}

/// A NAR holding one regular file with `content` (a derivation, as caches hold one).
pub fn single_file_nar(content: &[u8]) -> Vec<u8> {
    let mut nar = Vec::new();
    for s in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        content,
        b")",
    ] {
        nar.extend_from_slice(&(s.len() as u64).to_le_bytes());
        nar.extend_from_slice(s);
        nar.extend(std::iter::repeat_n(0u8, (8 - s.len() % 8) % 8));
    }
    nar
}

/// Waits (10 s at most) for an agent's stream to end with the refusal that says `why`.
pub async fn cut_off_saying(
    stream: &mut tonic::Streaming<nixfarm_proto::v1::CoordinatorMessage>,
    why: &str,
) {
    match tokio::time::timeout(std::time::Duration::from_secs(10), stream.message()).await {
        Ok(Err(s)) => assert!(
            s.code() == tonic::Code::PermissionDenied && s.message().contains(why),
            "{s:?}"
        ),
        other => panic!("its stream did not end with the refusal: {other:?}"),
    }
}
