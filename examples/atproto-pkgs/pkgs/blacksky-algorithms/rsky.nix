{ lib, mkPackage, fetchSrc, atproto-lexicons }:

let
  # Shared conformance vectors, checked out next to the workspace for the test suite.
  interop-tests = fetchSrc {
    owner = "bluesky-social";
    repo = "atproto-interop-tests";
    rev = "5a4b367f880c4b7ca06eb62c481e13430462311e";
    hash = lib.fakeHash;
  };
in
mkPackage {
  pname = "rsky";
  version = "0.1.0";

  src = fetchSrc {
    owner = "blacksky-algorithms";
    repo = "rsky";
    rev = "0c8a359151a4528d54011a776d3783fe91c6d6f0";
    hash = lib.fakeHash;
  };

  deps = [ atproto-lexicons interop-tests ];

  script = ''
    mkdir -p $out/bin
    echo "running interop vectors from $(head -n 1 ${interop-tests}/README.md)"
    printf '#!/bin/sh\necho "rsky-pds %s"\n' "$version" > $out/bin/rsky-pds
    chmod +x $out/bin/rsky-pds
  '';

  meta = {
    description = "AT Protocol services (PDS, relay, feed generator) in Rust";
    homepage = "https://github.com/blacksky-algorithms/rsky";
    license = "Apache-2.0";
  };
}
