{ lib, mkPackage, fetchSrc, indigo }:

mkPackage {
  pname = "konbini";
  version = "0-unstable-2025-06-01";

  src = fetchSrc {
    owner = "whyrusleeping";
    repo = "konbini";
    rev = "de8ffc1816c24e611cbc81c1a173687d10ad2af9";
    hash = "sha256-8VwXVpr7UlKRP+DkmzPjuTY2eUgu8XagmJsPbAvgDmI=";
  };

  deps = [ indigo ];

  script = ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "konbini %s"\n' "$version" > $out/bin/konbini
    chmod +x $out/bin/konbini
  '';

  meta = {
    description = "A small atproto AppView";
    homepage = "https://github.com/whyrusleeping/konbini";
    license = "MIT";
  };
}
