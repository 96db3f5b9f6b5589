{ lib, mkPackage, atproto-lexicons }:

mkPackage {
  pname = "atproto-api";
  version = "0.15.7";

  # Same monorepo checkout as the lexicons.
  inherit (atproto-lexicons) src;
  npmDepsHash = "sha256-V3d6Q3xwi2N0M/mlZ+srlOnmXXA0BI3QMvBydajyYxQ=";

  deps = [ atproto-lexicons ];

  script = ''
    d=$out/lib/node_modules/@atproto/api
    mkdir -p $d/node_modules
    echo "codegen: $(ls ${atproto-lexicons}/share/lexicons | grep -c '\.json$') lexicons"
    ls ${atproto-lexicons}/share/lexicons | sed -n 's/\.json$//p' > $d/lexicons.txt
    for dep in $(ls $npmDeps); do cp $npmDeps/$dep/checksum $d/node_modules/$dep.integrity; done
    printf 'module.exports = { version: "%s" };\n' "$version" > $d/index.js
  '';

  meta = {
    description = "TypeScript client for AT Protocol services (@atproto/api)";
    homepage = "https://github.com/bluesky-social/atproto/tree/main/packages/api";
    license = "MIT";
  };
}
