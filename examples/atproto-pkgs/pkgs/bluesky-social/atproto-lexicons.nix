{ lib, mkPackage, fetchSrc }:

mkPackage {
  pname = "atproto-lexicons";
  version = "0.4.12";

  src = fetchSrc {
    owner = "bluesky-social";
    repo = "atproto";
    rev = "9953dcdf3938117b7c69f831efa9b184e1dc6ec2";
    hash = "sha256-o6/3fT/L7enhSq7u4PYIEZItecUOQD3deLoVC5ntpHc=";
  };

  script = ''
    mkdir -p $out/share/lexicons
    for nsid in com.atproto.identity.resolveHandle com.atproto.repo.createRecord \
        com.atproto.repo.getRecord com.atproto.sync.getRepo com.atproto.sync.subscribeRepos \
        app.bsky.actor.profile app.bsky.feed.post app.bsky.graph.follow; do
      printf '{"lexicon": 1, "id": "%s"}\n' "$nsid" > $out/share/lexicons/$nsid.json
    done
    cp $src/README.md $out/share/lexicons/README.md
  '';

  meta = {
    description = "AT Protocol lexicon schemas (com.atproto.*, app.bsky.*)";
    homepage = "https://github.com/bluesky-social/atproto/tree/main/lexicons";
    license = "MIT";
  };
}
