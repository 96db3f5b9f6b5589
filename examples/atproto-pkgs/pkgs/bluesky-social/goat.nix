{ lib, mkPackage, fetchSrc, indigo }:

mkPackage {
  pname = "goat";
  version = "0.1.2";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "goat";
    rev = "9fd5b8a58f8c4755a5da83ef4db5754fbdf62e8a";
    hash = "sha256-XONoOUQQ5LiD2fNeHebOYmGzzMmxVFbqZP4XMCMPii8=";
  };

  vendorHash = "sha256-nNs7PLp2zFxxpZv42LGPO0lN5kSyWl5LyoiAfE4qRp4=";

  deps = [ indigo ];

  script = ''
    mkdir -p $out/bin
    n=$(ls ${indigo}/share/go/github.com/bluesky-social/indigo/api | wc -l)
    printf '#!/bin/sh\necho "goat %s (%s lexicon types, %s vendored modules)"\n' \
      "$version" "$n" "$(ls $goModules | wc -l)" > $out/bin/goat
    chmod +x $out/bin/goat
  '';

  meta = {
    description = "Go AT protocol CLI tool";
    homepage = "https://github.com/bluesky-social/goat";
    license = "MIT";
    mainProgram = "goat";
  };
}
