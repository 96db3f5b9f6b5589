# Helpers for this package set. Names follow nixpkgs (lib.fakeHash, fetchFromGitHub-like
# fetchSrc, buildNpmPackage-like mkPackage with npmDepsHash / cargoHash / vendorHash), but
# everything is plain `builtins.derivation` with /bin/sh so the repository needs no inputs.
{ system ? "x86_64-linux" }:
let
  # Builders get no PATH otherwise; host tools are used (sandbox off).
  PATH = "/usr/bin:/bin";

  optionalAttrs = cond: attrs: if cond then attrs else { };

  fakeHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  fakeSha256 = "0000000000000000000000000000000000000000000000000000";

  # Stand-in for fetchFromGitHub: a fixed-output "checkout" whose tree is derived from
  # owner/repo/rev only (no network), including a deps.lock that fetchDeps vendors.
  fetchSrc = { owner, repo, rev, hash ? null, sha256 ? null }:
    let
      drv = builtins.derivation {
        name = "source";
        inherit system PATH owner repo rev;
        builder = "/bin/sh";
        args = [ "-e" "-c" ''
          mkdir -p "$out/src"
          printf '# %s\n\nhttps://github.com/%s/%s, commit %s\n' "$repo" "$owner" "$repo" "$rev" > "$out/README.md"
          printf '%s\n' "$rev" > "$out/.git-rev"
          seed=$(printf '%s/%s@%s' "$owner" "$repo" "$rev" | sha256sum | cut -c1-48)
          i=0
          for chunk in $(printf '%s\n' "$seed" | fold -w 12); do
            i=$((i + 1))
            printf '%s-dep%d %s\n' "$repo" "$i" "$chunk"
          done > "$out/deps.lock"
          printf 'main() { echo "%s (%s)"; }\n' "$repo" "$(printf '%s' "$rev" | cut -c1-7)" > "$out/src/main.sh"
        '' ];
        outputHashAlgo = "sha256";
        outputHashMode = "recursive";
        outputHash =
          if hash != null then hash
          else if sha256 != null then sha256
          else throw "fetchSrc ${owner}/${repo}: either 'hash' or 'sha256' must be given";
      };
    in
    drv // { inherit rev owner repo; };

  # Second-stage fixed output (npmDeps / cargo vendor / Go modules): vendors what the
  # source's deps.lock lists. The output depends on the source's content and holds no
  # store path (a fixed output referring to one aborts Nix 2.8).
  fetchDeps = { name, src, hash }:
    builtins.derivation {
      inherit name system PATH src;
      builder = "/bin/sh";
      args = [ "-e" "-c" ''
        if [ ! -f "$src/deps.lock" ]; then echo "fetchDeps: source has no deps.lock" >&2; exit 1; fi
        mkdir -p "$out"
        while read -r dep sum; do
          mkdir -p "$out/$dep"
          printf '%s\n' "$sum" > "$out/$dep/checksum"
        done < "$src/deps.lock"
        sha256sum < "$src/deps.lock" | cut -d' ' -f1 > "$out/.lock-sha256"
      '' ];
      outputHashAlgo = "sha256";
      outputHashMode = "recursive";
      outputHash = hash;
    };

  # stdenv.mkDerivation-like: runs `script` with /bin/sh -e; $src, $deps and the vendored
  # dependencies ($npmDeps, $cargoDeps, $goModules) are in the environment.
  mkPackage = args@{ pname, version, src ? null, deps ? [ ], script, meta ? { }, ... }:
    let
      pos = builtins.unsafeGetAttrPos "pname" args;
      extra = removeAttrs args [ "pname" "version" "src" "deps" "script" "meta" ];
      vendored =
        optionalAttrs (args ? npmDepsHash) {
          npmDeps = fetchDeps { name = "${pname}-${version}-npm-deps"; inherit src; hash = args.npmDepsHash; };
        }
        // optionalAttrs (args ? cargoHash) {
          cargoDeps = fetchDeps { name = "${pname}-${version}-vendor"; inherit src; hash = args.cargoHash; };
        }
        // optionalAttrs (args ? vendorHash) {
          goModules = fetchDeps { name = "${pname}-${version}-go-modules"; inherit src; hash = args.vendorHash; };
        };
      drv = builtins.derivation (extra // vendored // {
        name = "${pname}-${version}";
        inherit system PATH pname version deps;
        builder = "/bin/sh";
        args = [ "-e" "-c" script ];
      } // optionalAttrs (src != null) { inherit src; });
    in
    drv // vendored // {
      inherit pname version src;
      meta = meta // optionalAttrs (pos != null) { position = "${pos.file}:${toString pos.line}"; };
    };
in
{
  inherit fakeHash fakeSha256 fetchSrc fetchDeps mkPackage optionalAttrs;
  concatStringsSep = builtins.concatStringsSep;
}
