{ lib, mkPackage, fetchSrc, atproto-api }:

mkPackage {
  pname = "statusphere-example-app";
  version = "0-unstable-2025-04-02";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "statusphere-example-app";
    rev = "bc8bdbbd5d7fe8832c234f6e354cf18d86bdb624";
    hash = lib.fakeHash;
  };

  npmDepsHash = lib.fakeHash;

  deps = [ atproto-api ];

  script = ''
    mkdir -p $out/bin $out/lib/statusphere
    ls $npmDeps > $out/lib/statusphere/node_modules.txt
    cp $src/src/main.sh $out/lib/statusphere/
    printf '#!/bin/sh\n. %s/lib/statusphere/main.sh\nmain\n' "$out" > $out/bin/statusphere
    chmod +x $out/bin/statusphere
  '';

  meta = {
    description = "Example atproto application: a status board";
    homepage = "https://github.com/bluesky-social/statusphere-example-app";
    license = "MIT";
  };
}
