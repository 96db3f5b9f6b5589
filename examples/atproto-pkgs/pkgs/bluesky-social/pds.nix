{ lib, mkPackage, fetchSrc, atproto-lexicons, atproto-api, xrpc-server }:

mkPackage {
  pname = "pds";
  version = "0.4.138";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "pds";
    rev = "599a045136864a7e4b813a441f08e6102366a5b9";
    hash = "sha256-IdkgDkWAdk/G3gkJcUw7Mcl6R6b0YY6Eb+e37Hnd4D4=";
  };

  deps = [ xrpc-server atproto-api atproto-lexicons ];

  # The wrapper refers to xrpc-server and the lexicons at run time.
  script = ''
    mkdir -p $out/bin $out/share/doc/pds
    cp $src/README.md $out/share/doc/pds/
    cat > $out/bin/pds <<EOF
    #!/bin/sh
    # Bluesky PDS $version
    export PDS_LEXICON_DIR=${atproto-lexicons}/share/lexicons
    exec /bin/sh ${xrpc-server}/lib/xrpc-server/serve.sh pds "\$@"
    EOF
    chmod +x $out/bin/pds
  '';

  meta = {
    description = "Bluesky Personal Data Server";
    homepage = "https://github.com/bluesky-social/pds";
    license = "MIT";
    mainProgram = "pds";
  };
}
