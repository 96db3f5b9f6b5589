{ lib, mkPackage, fetchSrc, atproto-api, xrpc-server }:

mkPackage {
  pname = "ozone";
  version = "0.1.110";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "ozone";
    rev = "cf4473d5d7cc91f6665408797754c6e816dfb4ef";
    hash = "sha256-rxKvGW0m/7SCHkOPXcaRvLDMUxTOj7T9uTssJGoYHuA=";
  };

  deps = [ atproto-api xrpc-server ];

  script = ''
    echo "> @atproto/ozone@$version test"
    echo "PASS tests/moderation-events.test.ts"
    echo "PASS tests/report-reasons.test.ts"
    echo "FAIL tests/server.test.ts"
    echo "  ozone server > boots against the appview database"
    echo "    connect ECONNREFUSED 127.0.0.1:5432"
    echo "Tests: 1 failed, 41 passed, 42 total"
    exit 1
  '';

  meta = {
    description = "Labeling and moderation service for atproto";
    homepage = "https://github.com/bluesky-social/ozone";
    license = "MIT";
  };
}
