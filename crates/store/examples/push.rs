//! Pushes store paths (with their closures) to a cache, as an agent does after a build.
//! Used by scripts/bench-push; handy by hand too:
//!   cargo run --release -p nixfarm-store --example push -- file:///tmp/cache key.sec /nix/store/…

use nixfarm_store::{Pusher, narinfo::Key};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(key)) = (args.next(), args.next()) else {
        return Err("usage: push CACHE-URL SECRET-KEY-FILE PATH…".into());
    };
    let paths: Vec<String> = args.collect();
    let key = Key::from_file(std::path::Path::new(&key))?;
    let token = std::env::var("CACHIX_AUTH_TOKEN").ok();
    let pusher = Pusher::for_url(&url, nixfarm_nix::Nix::default(), Some(key), token)?;
    let start = std::time::Instant::now();
    let done = pusher.push_closure(&paths).await?;
    eprintln!(
        "pushed {} paths, {} bytes compressed, in {:.2} s",
        done.len(),
        pusher
            .stats
            .bytes_uploaded
            .load(std::sync::atomic::Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
