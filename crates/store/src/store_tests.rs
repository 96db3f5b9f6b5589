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
}
