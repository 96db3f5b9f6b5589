//! Questions to the local store: which paths are missing, and which derivation produced a
//! path (its deriver, as Nix recorded it when it built or substituted the path).

use crate::runner::{Nix, NixError, tail};
use std::process::Stdio;
use tokio::process::Command;

impl Nix {
    /// Which of `paths` are not valid in the store, in one `nix-store` call.
    pub async fn invalid_paths(&self, paths: &[String]) -> Result<Vec<String>, NixError> {
        let mut out = Vec::new();
        for chunk in paths.chunks(2000) {
            let o = Command::new(&self.nix_store)
                .args(["--check-validity", "--print-invalid"])
                .args(chunk)
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(|e| NixError::Infra(format!("cannot run nix-store: {e}")))?;
            if !o.status.success() {
                return Err(NixError::Infra(format!(
                    "nix-store --check-validity failed: {}",
                    tail(&String::from_utf8_lossy(&o.stderr), 500)
                )));
            }
            out.extend(String::from_utf8_lossy(&o.stdout).lines().map(String::from));
        }
        Ok(out)
    }

    /// The derivation Nix recorded as having produced `path` (None: not valid here, or the
    /// deriver is unknown, as for paths added to the store directly).
    pub async fn deriver(&self, path: &str) -> Result<Option<String>, NixError> {
        let o = Command::new(&self.nix_store)
            .args(["--query", "--deriver", path])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| NixError::Infra(format!("cannot run nix-store: {e}")))?;
        if !o.status.success() {
            return Ok(None);
        }
        let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        Ok(out
            .starts_with('/')
            .then_some(out)
            .filter(|d| d.ends_with(".drv")))
    }
}
