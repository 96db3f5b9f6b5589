{ lib, mkPackage, fetchSrc, indigo }:

mkPackage {
  pname = "jetstream";
  version = "0.2.4";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "jetstream";
    rev = "main";
    hash = "sha256-bd8O+HSpazeWUgFoBjx/8yAxJMM54lZ9yoQjH0Ckhe0=";
  };

  vendorHash = "sha256-fe6WFN6yMNJTmR09Mhh3ncoOoHYB9yBDuVJRx4IMEGI=";

  deps = [ indigo ];

  script = ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "jetstream %s: JSON firehose"\n' "$version" > $out/bin/jetstream
    chmod +x $out/bin/jetstream
    ls $goModules > $out/modules.txt
  '';

  meta = {
    description = "Simplified JSON event stream for atproto";
    homepage = "https://github.com/bluesky-social/jetstream";
    license = "MIT";
    mainProgram = "jetstream";
  };
}
