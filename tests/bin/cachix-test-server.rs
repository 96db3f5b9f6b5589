//! The Cachix API test server as a program, to try `--cache cachix://NAME` by hand:
//!   nixfarm-cachix-test-server --dir /tmp/cachix --name demo --token secret --public-key-file pk
//! It prints the API root and the cache's URI, then serves until killed.

use nixfarm_tests::cachix_server::{CachixServer, ServerConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut name, mut token, mut pk) = (None, None, None, None);
    while let Some(a) = args.next() {
        let v = args.next();
        match a.as_str() {
            "--dir" => dir = v,
            "--name" => name = v,
            "--token" => token = v,
            "--public-key-file" => pk = v,
            _ => anyhow::bail!(
                "usage: nixfarm-cachix-test-server --dir D --name N --token T --public-key-file F"
            ),
        }
    }
    let (Some(dir), Some(name), Some(token), Some(pk)) = (dir, name, token, pk) else {
        anyhow::bail!(
            "usage: nixfarm-cachix-test-server --dir D --name N --token T --public-key-file F"
        );
    };
    let server = CachixServer::start(ServerConfig {
        public_key: std::fs::read_to_string(pk)?.trim().to_string(),
        name: name.clone(),
        token,
        dir: dir.into(),
        fail_every: 0,
        drop_every: 0,
        refuse_prefix: None,
        serves_cache_info: true,
    })?;
    println!("api {}", server.api_url());
    println!("uri {}", server.uri(&name));
    loop {
        std::thread::park();
    }
}
