{
  description = "AT Protocol / Bluesky services, libraries and tools (community package repository)";

  # No inputs: every package is a plain derivation built with /bin/sh (see lib/default.nix).
  outputs = { self }:
    let
      system = "x86_64-linux";
      lib = import ./lib { inherit system; };
    in
    {
      lib = { inherit (lib) fakeHash fakeSha256; };
      packages.${system} = import ./pkgs { inherit lib; };
    };
}
