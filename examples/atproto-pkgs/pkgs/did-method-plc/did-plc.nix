{ lib, mkPackage, fetchSrc, atproto-api }:

mkPackage {
  pname = "did-plc";
  version = "0.0.1";

  src = fetchSrc {
    owner = "did-method-plc";
    repo = "did-method-plc";
    rev = "9d669dcc34f30b9af9e783ae57c92f0709ea02a5";
    hash = lib.fakeHash;
  };

  deps = [ atproto-api ];

  script = ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "plc server %s"\n' "$version" > $out/bin/plc-server
    chmod +x $out/bin/plc-server
  '';

  meta = {
    description = "DID PLC directory server";
    homepage = "https://github.com/did-method-plc/did-method-plc";
    license = "MIT";
    mainProgram = "plc-server";
  };
}
