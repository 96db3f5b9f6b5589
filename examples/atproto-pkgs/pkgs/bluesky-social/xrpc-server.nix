{ lib, mkPackage, atproto-lexicons, atproto-api }:

mkPackage {
  pname = "xrpc-server";
  version = "0.7.19";

  inherit (atproto-lexicons) src;

  deps = [ atproto-api atproto-lexicons ];

  script = ''
    mkdir -p $out/lib/xrpc-server
    cp $src/src/main.sh $out/lib/xrpc-server/main.sh
    cat > $out/lib/xrpc-server/serve.sh <<EOF
    # @atproto/xrpc-server $version
    . $out/lib/xrpc-server/main.sh
    echo "xrpc: serving \$1 with $(cat ${atproto-api}/lib/node_modules/@atproto/api/lexicons.txt | wc -l) methods"
    echo "xrpc: client library ${atproto-api}/lib/node_modules/@atproto/api"
    EOF
  '';

  meta = {
    description = "XRPC server framework for AT Protocol services (@atproto/xrpc-server)";
    homepage = "https://github.com/bluesky-social/atproto/tree/main/packages/xrpc-server";
    license = "MIT";
  };
}
