{ lib, mkPackage, indigo }:

mkPackage {
  pname = "relay";
  inherit (indigo) version src;

  deps = [ indigo indigo.goModules ];

  # The integration tests wait for firehose events that never come in a build
  # environment; the farm's meta.maxSilent stops them.
  script = ''
    sleep 60
    echo "FAIL: no #commit events received from the upstream firehose"
    exit 1
  '';

  meta = {
    description = "atproto relay (firehose aggregator), from indigo/cmd/relay";
    homepage = "https://github.com/bluesky-social/indigo/tree/main/cmd/relay";
    license = "MIT";
    mainProgram = "relay";
    timeout = 20;
    maxSilent = 3;
  };
}
