{ lib, mkPackage, fetchSrc }:

mkPackage {
  pname = "go-cid";
  version = "0.5.0";

  src = fetchSrc {
    owner = "ipfs";
    repo = "go-cid";
    rev = "ebb820fa228239f034d9d8b604fc6655ef11fcda";
    hash = "sha256-pBVRgNYi//OcvPHgNnAJu66U1ihhclob6upzGYzr6Aw=";
  };

  script = ''
    d=$out/share/go/github.com/ipfs/go-cid
    mkdir -p $d
    cp $src/src/main.sh $src/README.md $d/
    echo "v$version" > $d/VERSION
  '';

  meta = {
    description = "Content ID v1 implemented in Go";
    homepage = "https://github.com/ipfs/go-cid";
    license = "MIT";
  };
}
