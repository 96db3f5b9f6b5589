{ lib, mkPackage, fetchSrc, go-cid }:

mkPackage {
  pname = "cbor-gen";
  version = "0.3.1";

  src = fetchSrc {
    owner = "whyrusleeping";
    repo = "cbor-gen";
    rev = "58056c6b2b4820e942e7bf1bc109f52066c691d0";
    hash = "sha256-+16h2ACpaJvzJt9+OeqQ2RURGcjgZlRfQSlWtGU8vsg=";
  };

  deps = [ go-cid ];

  script = ''
    d=$out/share/go/github.com/whyrusleeping/cbor-gen
    mkdir -p $d
    cp $src/src/main.sh $d/
    echo "cid support: go-cid $(cat ${go-cid}/share/go/github.com/ipfs/go-cid/VERSION)" > $d/BUILDINFO
  '';

  meta = {
    description = "Codegen for CBOR marshalers of Go types";
    homepage = "https://github.com/whyrusleeping/cbor-gen";
    license = "MIT";
  };
}
