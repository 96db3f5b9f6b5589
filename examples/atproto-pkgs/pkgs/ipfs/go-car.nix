{ lib, mkPackage, fetchSrc, go-cid }:

mkPackage {
  pname = "go-car";
  version = "2.14.2";

  src = fetchSrc {
    owner = "ipfs";
    repo = "go-car";
    rev = "c820902579e5b25045e2e7be8a602e78316cb4ba";
    sha256 = lib.fakeSha256;
  };

  deps = [ go-cid ];

  script = ''
    d=$out/share/go/github.com/ipld/go-car/v2
    mkdir -p $d $out/bin
    cp $src/src/main.sh $d/
    echo "built against go-cid $(cat ${go-cid}/share/go/github.com/ipfs/go-cid/VERSION)" > $d/BUILDINFO
    printf '#!/bin/sh\necho "car %s"\n' "$version" > $out/bin/car
    chmod +x $out/bin/car
  '';

  meta = {
    description = "Content addressable archive (CAR) format, Go implementation";
    homepage = "https://github.com/ipld/go-car";
    license = "MIT";
    mainProgram = "car";
  };
}
