{ lib, mkPackage, fetchSrc, atproto-api, xrpc-server }:

let
  # Upstream ships better-sqlite3 prebuilt binaries only; nothing here builds it from source.
  better-sqlite3 = throw "feed-generator: unsupported on this platform (better-sqlite3 has no prebuilt binary for x86_64-linux)";
in
mkPackage {
  pname = "feed-generator";
  version = "0-unstable-2025-03-18";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "feed-generator";
    rev = "257a3c54dc7dc1ae9f589866b8ce95fff88aaa19";
    hash = "sha256-bQKBbcyeSwG5+USJ7npSxOu3ZLmPtBJEZ9ObCaSTL60=";
  };

  deps = [ atproto-api xrpc-server better-sqlite3 ];

  script = ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "feed-generator %s"\n' "$version" > $out/bin/feed-generator
    chmod +x $out/bin/feed-generator
  '';

  meta = {
    description = "ATProto feed generator starter kit";
    homepage = "https://github.com/bluesky-social/feed-generator";
    license = "MIT";
  };
}
