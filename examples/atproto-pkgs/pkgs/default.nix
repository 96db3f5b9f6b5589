# The package set: one package per file, pkgs/<github owner>/<name>.nix.
{ lib }:
let
  # callPackage: pass each package the arguments it names, from this set.
  callPackage = path: overrides:
    let
      f = import path;
      scope = { inherit lib; inherit (lib) mkPackage fetchSrc fetchDeps; } // self;
    in
    f (builtins.intersectAttrs (builtins.functionArgs f) scope // overrides);

  self = {
    # bluesky-social/atproto monorepo
    atproto-lexicons = callPackage ./bluesky-social/atproto-lexicons.nix { };
    atproto-api = callPackage ./bluesky-social/atproto-api.nix { };
    xrpc-server = callPackage ./bluesky-social/xrpc-server.nix { };

    # services
    pds = callPackage ./bluesky-social/pds.nix { };
    ozone = callPackage ./bluesky-social/ozone.nix { };
    feed-generator = callPackage ./bluesky-social/feed-generator.nix { };
    statusphere-example-app = callPackage ./bluesky-social/statusphere-example-app.nix { };
    did-plc = callPackage ./did-method-plc/did-plc.nix { };
    skywatch-automod = callPackage ./skywatch-bsky/skywatch-automod.nix { };

    # Go
    go-cid = callPackage ./ipfs/go-cid.nix { };
    go-car = callPackage ./ipfs/go-car.nix { };
    cbor-gen = callPackage ./whyrusleeping/cbor-gen.nix { };
    indigo = callPackage ./bluesky-social/indigo.nix { };
    goat = callPackage ./bluesky-social/goat.nix { };
    relay = callPackage ./bluesky-social/relay.nix { };
    jetstream = callPackage ./bluesky-social/jetstream.nix { };
    konbini = callPackage ./whyrusleeping/konbini.nix { };

    # Rust
    atrium = callPackage ./sugyan/atrium.nix { };
    rsky = callPackage ./blacksky-algorithms/rsky.nix { };
  };
in
self
