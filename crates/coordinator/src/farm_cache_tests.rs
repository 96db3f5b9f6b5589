//! Unit tests of `farm_cache.rs`.
use super::*;

/// A cache path: its narinfo and a NAR of `size` bytes, last used `age` ago.
fn put(dir: &std::path::Path, hash: &str, size: usize, age: std::time::Duration) {
    let nar = format!("{hash}x.nar.zst");
    std::fs::write(dir.join("nar").join(&nar), vec![0u8; size]).unwrap();
    let ni = NarInfo {
        store_path: format!("/nix/store/{hash}-p"),
        url: format!("nar/{nar}"),
        compression: "zstd".into(),
        file_hash: vec![0; 32],
        file_size: size as u64,
        nar_hash: vec![0; 32],
        nar_size: size as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    let p = dir.join(format!("{hash}.narinfo"));
    std::fs::write(&p, ni.render()).unwrap();
    for p in [p, dir.join("nar").join(&nar)] {
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
    }
}

#[test]
fn eviction_takes_the_least_recently_used_and_spares_active_runs_and_recent_paths() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("farm-cache");
    let hour = std::time::Duration::from_secs(3600);
    let h = |c: char| c.to_string().repeat(32);
    let protected: Protected = {
        let keep = h('b');
        Arc::new(move || [keep.clone()].into())
    };
    let cache = FarmCache::open(dir.clone(), Default::default(), 1 << 20, 1000, protected).unwrap();
    put(&dir, &h('a'), 400, 3 * hour); // oldest: goes
    put(&dir, &h('b'), 400, 3 * hour); // as old, but an active run needs it
    put(&dir, &h('c'), 400, 2 * hour); // goes too, to get under 900
    put(&dir, &h('d'), 400, std::time::Duration::ZERO); // just written: stays
    cache.total.store(nar_bytes(&dir), Ordering::Relaxed);
    let removed = cache.evict();
    assert_eq!(removed, vec![h('a'), h('c')]);
    for (c, kept) in [('a', false), ('b', true), ('c', false), ('d', true)] {
        assert_eq!(dir.join(format!("{}.narinfo", h(c))).exists(), kept, "{c}");
        assert_eq!(
            dir.join("nar").join(format!("{}x.nar.zst", h(c))).exists(),
            kept,
            "{c}"
        );
    }
    assert_eq!(cache.total.load(Ordering::Relaxed), 800);
    assert!(cache.evict().is_empty(), "under the limit now");
}

#[test]
fn eviction_keeps_a_nar_another_path_still_uses_and_takes_nars_no_path_uses() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("farm-cache");
    let hour = std::time::Duration::from_secs(3600);
    let h = |c: char| c.to_string().repeat(32);
    let none: Protected = Arc::new(Default::default);
    let cache = FarmCache::open(dir.clone(), Default::default(), 1 << 20, 1000, none).unwrap();
    put(&dir, &h('a'), 400, 3 * hour); // oldest: goes, but its NAR is h's too
    put(&dir, &h('c'), 400, 2 * hour); // goes, to get under 900
    put(&dir, &h('d'), 400, std::time::Duration::ZERO);
    // h: the same content as a (one NAR), just written ('e' is no letter of Nix's base-32).
    let a_info = std::fs::read_to_string(dir.join(format!("{}.narinfo", h('a')))).unwrap();
    std::fs::write(
        dir.join(format!("{}.narinfo", h('h'))),
        a_info.replace(&format!("{}-p", h('a')), &format!("{}-p", h('h'))),
    )
    .unwrap();
    cache.total.store(nar_bytes(&dir), Ordering::Relaxed);
    assert_eq!(cache.evict(), vec![h('a'), h('c')]);
    assert!(!dir.join(format!("{}.narinfo", h('a'))).exists());
    let shared = dir.join("nar").join(format!("{}x.nar.zst", h('a')));
    assert!(shared.exists(), "h still serves it");
    assert_eq!(cache.total.load(Ordering::Relaxed), 800);
    // A NAR no narinfo points at (an upload whose narinfo never came): taken first once it
    // is not recent; one just uploaded stays (its narinfo may be on the way).
    let orphan = dir.join("nar").join(format!("{}x.nar.zst", h('f')));
    std::fs::write(&orphan, vec![0u8; 700]).unwrap();
    let fresh = dir.join("nar").join(format!("{}x.nar.zst", h('g')));
    std::fs::write(&fresh, vec![0u8; 10]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - hour)
        .unwrap();
    cache.total.store(nar_bytes(&dir), Ordering::Relaxed);
    assert!(cache.evict().is_empty(), "no path had to go");
    assert!(!orphan.exists());
    assert!(fresh.exists() && shared.exists());
    assert_eq!(cache.total.load(Ordering::Relaxed), 810);
}

#[test]
fn eviction_spares_a_nar_uploaded_again_for_a_narinfo_on_the_way() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("farm-cache");
    let hour = std::time::Duration::from_secs(3600);
    let h = |c: char| c.to_string().repeat(32);
    let none: Protected = Arc::new(Default::default);
    let cache = FarmCache::open(dir.clone(), Default::default(), 1 << 20, 500, none).unwrap();
    put(&dir, &h('a'), 600, 3 * hour);
    // Another path of the same content: its NAR was just uploaded again (put_nar found it
    // there and touched it), its narinfo not yet.
    let nar = dir.join("nar").join(format!("{}x.nar.zst", h('a')));
    super::touch(&nar);
    cache.total.store(nar_bytes(&dir), Ordering::Relaxed);
    assert_eq!(cache.evict(), vec![h('a')]);
    assert!(nar.exists(), "the NAR a narinfo is about to point at stays");
}

#[test]
fn only_cache_file_names_are_served_or_stored() {
    assert!(is_narinfo_name("0123456789abcdfghijklmnpqrsvwxyz.narinfo"));
    assert!(!is_narinfo_name("../etc/passwd.narinfo"));
    assert!(!is_narinfo_name("short.narinfo"));
    assert!(is_nar_name("1b2c3d.nar.zst"));
    assert!(is_nar_name("1b2c3d.nar.xz"));
    assert!(!is_nar_name("..nar"));
    assert!(!is_nar_name("a/b.nar"));
    assert!(!is_nar_name(".nar.zst"));
}

#[test]
fn a_token_issued_at_registration_is_admitted_as_bearer_or_netrc_password_and_nothing_else_is() {
    let d = tempfile::tempdir().unwrap();
    let issued = Arc::new(crate::farm_tokens::FarmTokens::default());
    let token = issued.issue("cert-agent").unwrap();
    issued.connected("cert-agent", 1);
    let admission = crate::farm_tokens::FarmAdmission {
        tokens: None,
        issued: Some(issued),
    };
    let cache = FarmCache::open(
        d.path().join("farm-cache"),
        admission,
        1 << 20,
        1000,
        Arc::new(Default::default),
    )
    .unwrap();
    let with = |value: Option<String>| {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert("authorization", v.parse().unwrap());
        }
        cache.authorized(&h)
    };
    let basic = |user: &str, password: &str| {
        format!(
            "Basic {}",
            data_encoding::BASE64.encode(format!("{user}:{password}").as_bytes())
        )
    };
    assert!(with(Some(format!("Bearer {token}"))));
    assert!(with(Some(basic("nixfarm", &token))));
    assert!(!with(None));
    assert!(!with(Some("Bearer guess".into())));
    assert!(!with(Some(basic("nixfarm", "guess"))));
    assert!(!with(Some(token.clone())), "no scheme");
}
