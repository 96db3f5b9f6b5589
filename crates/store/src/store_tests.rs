//! Unit tests of `lib.rs`.
use super::*;
use sha2::{Digest, Sha256};
use std::io::Read;

#[test]
fn cache_urls() {
    assert_eq!(
        Target::parse("cachix://my-cache").unwrap(),
        Target::Cachix {
            name: "my-cache".into(),
            api: CACHIX_API.into()
        }
    );
    assert_eq!(
        Target::parse(&cachix_url("c", Some("http://127.0.0.1:9/api/v1"))).unwrap(),
        Target::Cachix {
            name: "c".into(),
            api: "http://127.0.0.1:9/api/v1/".into()
        }
    );
    assert_eq!(
        Target::parse("file:///srv/cache?compression=zstd").unwrap(),
        Target::File("/srv/cache".into())
    );
    assert!(
        matches!(Target::parse("https://c.example/x/").unwrap(), Target::Http(u) if u == "https://c.example/x")
    );
    for bad in [
        "s3://bucket",
        "cachix://",
        "cachix://a/b",
        "file://relative",
    ] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn staging_hashes_both_streams_and_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    std::fs::write(&f, vec![b'a'; 300_000]).unwrap();
    let mut xz = stage(&f, Compression::Xz, 3, None, false).unwrap();
    let mut xz_bytes = Vec::new();
    xz.file.read_to_end(&mut xz_bytes).unwrap();
    let mut unpacked = Vec::new();
    xz2::read::XzDecoder::new(xz_bytes.as_slice())
        .read_to_end(&mut unpacked)
        .unwrap();
    assert_eq!(xz.file_size, xz_bytes.len() as u64);
    let mut staged = stage(&f, Compression::Zstd, 3, None, true).unwrap();
    let mut nar = Vec::new();
    nar::dump(&f, &mut nar).unwrap();
    assert_eq!(staged.nar_size, nar.len() as u64);
    assert_eq!(staged.nar_hash, Sha256::digest(&nar).to_vec());
    let mut compressed = Vec::new();
    staged.file.read_to_end(&mut compressed).unwrap();
    assert_eq!(staged.file_size, compressed.len() as u64);
    assert!(staged.file_size < 10_000);
    assert_eq!(staged.file_hash, Sha256::digest(&compressed).to_vec());
    assert_eq!(zstd::decode_all(compressed.as_slice()).unwrap(), nar);
    assert_eq!(unpacked, nar);
    assert_eq!(xz.nar_hash, staged.nar_hash);
}

#[test]
fn a_servers_html_page_becomes_one_short_line() {
    let page = "<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n";
    assert_eq!(one_line(page, 120), "403 Forbidden");
    assert_eq!(one_line("<p>quota\n exceeded</p>", 120), "quota exceeded");
    assert_eq!(one_line(&"x".repeat(500), 10).chars().count(), 10);
    assert_eq!(one_line("red\x1b[31m\x07 alert", 120), "red [31m alert");
}

#[tokio::test]
async fn derivers_come_from_the_caches_narinfos_and_a_wrong_answer_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pusher::for_url(
        &format!("file://{}", dir.path().display()),
        Nix::default(),
        None,
        None,
    )
    .unwrap();
    let path = |c: char, name: &str| format!("/nix/store/{}-{name}", c.to_string().repeat(32));
    let narinfo = |store_path: &str, deriver: &str| {
        format!(
            "StorePath: {store_path}\nURL: nar/x.nar\nCompression: none\nFileHash: sha256:{h}\nFileSize: 1\nNarHash: sha256:{h}\nNarSize: 1\nReferences: \nDeriver: {deriver}\n",
            h = "0".repeat(52)
        )
    };
    let (known, unknown, wrong, absent) = (
        path('a', "source"),
        path('b', "source"),
        path('c', "source"),
        path('d', "source"),
    );
    let write = |p: &str, text: String| {
        std::fs::write(
            dir.path()
                .join(format!("{}.narinfo", crate::narinfo::store_hash(p))),
            text,
        )
        .unwrap()
    };
    let producer = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-source.drv";
    write(&known, narinfo(&known, producer));
    write(&unknown, narinfo(&unknown, "unknown-deriver"));
    // Served under c's hash, but for another path.
    write(&wrong, narinfo(&known, producer));
    let got = p
        .derivers(&[known, unknown, wrong, absent])
        .await
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect::<Vec<_>>();
    assert_eq!(got[0], Ok(Some(format!("/nix/store/{producer}"))));
    assert_eq!(got[1], Ok(None));
    assert!(
        got[2].as_ref().is_err_and(|e| e.contains("answered for")),
        "{:?}",
        got[2]
    );
    assert!(
        got[3].as_ref().is_err_and(|e| e.contains("no narinfo")),
        "{:?}",
        got[3]
    );
}

/// A cache (or a host named as one) that refuses with an endless body: the pusher reads the
/// first few KB of what it says and stops.
#[tokio::test]
async fn an_endless_error_page_is_read_only_so_far() {
    let addr = raw_server(|_| Reply::Endless403).await;
    let p = keyless_pusher(addr);
    let asked = std::time::Instant::now();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        p.missing(&["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x".to_string()]),
    )
    .await
    .expect("the answer was read to its end");
    let e = r.unwrap_err().to_string();
    assert!(e.contains("403"), "{e}");
    assert!(e.len() < 1000, "{} bytes", e.len());
    assert!(asked.elapsed() < std::time::Duration::from_secs(20));
}

/// A cache that answers writes with 303 (a login page) or 404, and lookups with a redirect to
/// a page that answers 200: nothing counts as written or as present.
#[tokio::test]
async fn a_write_is_done_only_on_a_2xx_and_a_redirect_proves_nothing() {
    let addr = raw_server(|head| {
        let line = head.lines().next().unwrap_or_default();
        Reply::Send(if line.contains(" /login ") {
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        } else if line.contains("/gone") {
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        } else {
            "HTTP/1.1 303 See Other\r\nlocation: /login\r\ncontent-length: 0\r\n\r\n"
        })
    })
    .await;
    let p = keyless_pusher(addr);
    for url in [
        format!("http://{addr}/cache/x.nar"),
        format!("http://{addr}/gone/x.nar"),
    ] {
        let r = p
            .send_write("uploading", || p.http.put(&url).body("nar"))
            .await;
        let e = r.expect_err("not written").to_string();
        assert!(e.contains("303") || e.contains("404"), "{e}");
    }
    // Present only if the cache says so itself, not a page it sends the client to.
    let path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x".to_string();
    let e = p.missing(std::slice::from_ref(&path)).await.unwrap_err();
    assert!(e.to_string().contains("303"), "{e}");
}

/// A cache that takes a push's requests and never answers them: the push ends by its
/// deadline (its floor, plus its NARs' bytes at the floor rate), not after each request's
/// timeout and each retry.
#[tokio::test]
async fn a_push_to_a_cache_that_never_answers_ends_by_its_deadline() {
    let path = added_to_store("stalled");
    let addr = raw_server(|head| {
        if head.starts_with("PUT ") {
            Reply::Hang
        } else {
            Reply::Send("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        }
    })
    .await;
    let key = crate::narinfo::Key::generate("stall-1").unwrap();
    let mut p = Pusher::for_url(
        &format!("http://{addr}/cache"),
        nixfarm_nix::Nix::default(),
        Some(key),
        None,
    )
    .unwrap();
    p.opts.push_floor = std::time::Duration::from_secs(2);
    p.opts.push_floor_rate = u64::MAX;
    let started = std::time::Instant::now();
    let e = p
        .push_closure_with(&[path], &crate::arbiter::Alone)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("did not end within 2 s"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// An arbiter whose every path is someone else's, for ever (a pusher that renews its claims
/// and never uploads).
struct NeverMine;

impl crate::Arbiter for NeverMine {
    async fn claim(&self, paths: &[String]) -> Vec<bool> {
        vec![false; paths.len()]
    }
    async fn release(&self, _: &[String]) {}
}

/// Paths another pusher holds claims on and never uploads are uploaded here after the
/// claim patience, and the push succeeds: before, it waited until its deadline and failed
/// (the package not-cached).
#[tokio::test]
async fn claims_never_honoured_hold_a_push_only_for_the_patience() {
    let path = added_to_store("claimed");
    let dir = tempfile::tempdir().unwrap();
    let key = crate::narinfo::Key::generate("claims-1").unwrap();
    let mut p = Pusher::for_url(
        &format!("file://{}", dir.path().display()),
        nixfarm_nix::Nix::default(),
        Some(key),
        None,
    )
    .unwrap();
    p.opts.claim_patience = std::time::Duration::from_secs(1);
    p.opts.push_floor = std::time::Duration::from_secs(60);
    let pushed = p
        .push_closure_with(std::slice::from_ref(&path), &NeverMine)
        .await
        .unwrap();
    assert_eq!(pushed, std::slice::from_ref(&path));
    assert!(p.missing(&[path]).await.unwrap().is_empty());
}

/// A key without a name (CACHIX_SIGNING_KEY's form) signs only for Cachix: for a file:// or
/// HTTP cache its signatures would read `Sig: :…`, which Nix refuses, so such a pusher is
/// refused up front, saying what to give instead.
#[test]
fn a_nameless_key_is_refused_for_caches_other_than_cachix() {
    let named = crate::narinfo::Key::generate("farm-1").unwrap();
    let secret = named.secret_text();
    let nameless = crate::narinfo::Key::parse(secret.split_once(':').unwrap().1).unwrap();
    assert!(nameless.name.is_empty());
    for url in ["file:///tmp/nixfarm-nameless", "http://127.0.0.1:1/cache"] {
        let e = Pusher::for_url(
            url,
            nixfarm_nix::Nix::default(),
            Some(nameless.clone()),
            None,
        )
        .err()
        .expect("refused");
        assert!(e.to_string().contains("has no name"), "{e}");
        Pusher::for_url(url, nixfarm_nix::Nix::default(), Some(named.clone()), None).unwrap();
    }
    Pusher::for_url(
        "cachix://farm",
        nixfarm_nix::Nix::default(),
        Some(nameless),
        Some("token".into()),
    )
    .unwrap();
}

/// A cache that takes the questions before a push (HEAD, is the path there?) and the
/// narinfo reads after it, and never answers: both end by the push floor, not after each
/// request's timeout and retries, path after path.
#[tokio::test]
async fn a_cache_that_never_answers_its_presence_questions_holds_nothing_past_the_floor() {
    let addr = raw_server(|_| Reply::Hang).await;
    let mut p = keyless_pusher(addr);
    p.opts.push_floor = std::time::Duration::from_secs(2);
    let paths: Vec<String> = (0..40)
        .map(|i| format!("/nix/store/{}-p{i}", "0123456789abcdfghijklmnpqrsvwxyz"))
        .collect();
    let started = std::time::Instant::now();
    let e = p.missing(&paths).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("did not say which of 40 paths it has within 2 s"),
        "{e}"
    );
    let read = p.signed_by(&paths, &["k-1:x".to_string()]).await;
    assert_eq!(read.len(), 40);
    for r in read {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("within 2 s"), "{e}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// A new path in this machine's store (`nix-store --add` of a file saying `what` and the
/// time, so each test's is its own).
fn added_to_store(what: &str) -> String {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!("{what} {:?}", std::time::SystemTime::now()),
    )
    .unwrap();
    let added = std::process::Command::new("nix-store")
        .arg("--add")
        .arg(file.path())
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    String::from_utf8(added.stdout).unwrap().trim().to_string()
}

/// What [`raw_server`] does with a request, given its head.
enum Reply {
    Send(&'static str),
    /// Takes it and never answers.
    Hang,
    /// A 403 whose body never ends.
    Endless403,
}

/// A cache (or a host named as one) on 127.0.0.1 that answers each request as `reply` says.
async fn raw_server(reply: fn(&str) -> Reply) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let n = s.read(&mut buf).await.unwrap_or(0);
                match reply(&String::from_utf8_lossy(&buf[..n])) {
                    Reply::Send(answer) => {
                        let _ = s.write_all(answer.as_bytes()).await;
                    }
                    Reply::Hang => {
                        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    }
                    Reply::Endless403 => {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n",
                            )
                            .await;
                        let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                        // Endless, until the client goes.
                        while s.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                }
            });
        }
    });
    addr
}

/// A pusher without a key for the cache at `addr`'s `/cache`.
fn keyless_pusher(addr: std::net::SocketAddr) -> Pusher {
    Pusher::for_url(
        &format!("http://{addr}/cache"),
        nixfarm_nix::Nix::default(),
        None,
        None,
    )
    .unwrap()
}
