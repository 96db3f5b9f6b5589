//! What a non-flake run evaluates: a Nix file of the uploaded tree (`default.nix`, `ci.nix`)
//! and the arguments it is called with, checked the same way by everyone who reads them.

/// Most arguments a run may pass.
pub const MAX_ARGS: usize = 64;
/// Longest argument value, bytes.
pub const MAX_ARG_VALUE: usize = 4096;

/// Why a file name or an argument is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct BadEntry(pub String);

/// A file of the tree: relative, no `..`, a `.nix` name, of sane length.
pub fn check_file(file: &str) -> Result<(), BadEntry> {
    let ok = !file.is_empty()
        && file.len() <= 256
        && file.ends_with(".nix")
        && !file.starts_with('/')
        && file
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !file.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(BadEntry(format!(
            "--file '{}' is not a .nix file inside the checkout (a relative path without ..)",
            crate::limits::clip(file, 80)
        )))
    }
}

/// A flake's directory in its snapshot (a flake in a subdirectory of a git repository,
/// read with the whole repository as Nix reads `./sub`): a relative path of plain
/// components, in characters a flake reference's `?dir=` carries as they are.
pub fn check_flake_dir(dir: &str) -> Result<(), BadEntry> {
    let ok = !dir.is_empty()
        && dir.len() <= 256
        && !dir.starts_with('/')
        && dir
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && dir
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(BadEntry(format!(
            "the flake's directory '{}' is not a plain relative path (letters, digits, - _ . + and /)",
            crate::limits::clip(dir, 80)
        )))
    }
}

/// An argument: a Nix identifier for a name, a bounded value without NUL bytes.
pub fn check_arg(name: &str, value: &str) -> Result<(), BadEntry> {
    let mut chars = name.chars();
    let ident = name.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '\''));
    if !ident {
        return Err(BadEntry(format!(
            "argument name '{}' is not a Nix identifier",
            crate::limits::clip(name, 80)
        )));
    }
    if value.len() > MAX_ARG_VALUE || value.contains('\0') {
        return Err(BadEntry(format!(
            "the value of argument {name} is longer than {MAX_ARG_VALUE} bytes or holds a NUL byte"
        )));
    }
    Ok(())
}

/// An overridden flake input: a name like an input's (`nixpkgs`, `utils/nixpkgs`) and a
/// flake reference a farm may fetch (a local one only where `allow_local`).
pub fn check_override(name: &str, reference: &str, allow_local: bool) -> Result<(), BadEntry> {
    let ok_name =
        !name.is_empty() && name.len() <= 128 && name.split('/').all(|p| check_arg(p, "").is_ok());
    if !ok_name {
        return Err(BadEntry(format!(
            "'{}' is not a flake input name",
            crate::limits::clip(name, 80)
        )));
    }
    crate::flakeref::validate_for_farm(reference, allow_local)
        .map_err(|e| BadEntry(format!("input {name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flake_dir_is_a_plain_relative_path() {
        for ok in ["nix", "a/b-c_d.e+f", "sub/flake"] {
            assert!(check_flake_dir(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/abs", "../x", "a//b", "a/./b", "a b", "a?b", "a#b", "a&dir=b",
        ] {
            assert!(check_flake_dir(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_stay_inside_the_tree() {
        for ok in ["default.nix", "ci.nix", "nix/ci.nix"] {
            assert!(check_file(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/x.nix",
            "../x.nix",
            "a/../../x.nix",
            "x.txt",
            "./x.nix",
            "a//b.nix",
        ] {
            assert!(check_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_are_input_names_and_farm_references() {
        assert!(check_override("nixpkgs", "github:NixOS/nixpkgs/nixos-24.05", false).is_ok());
        assert!(check_override("utils/nixpkgs", "github:NixOS/nixpkgs", false).is_ok());
        assert!(check_override("nixpkgs", "path:/etc", false).is_err());
        assert!(check_override("nixpkgs", "path:/srv/nixpkgs", true).is_ok());
        assert!(check_override("a b", "github:o/r", false).is_err());
    }

    #[test]
    fn arguments_are_identifiers_with_bounded_values() {
        assert!(check_arg("pkgs", "import <nixpkgs> {}").is_ok());
        assert!(check_arg("with-dash'", "x").is_ok());
        assert!(check_arg("1x", "x").is_err());
        assert!(check_arg("a b", "x").is_err());
        assert!(check_arg("a", &"x".repeat(5000)).is_err());
    }
}
