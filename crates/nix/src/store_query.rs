//! Questions to the local store: which paths are missing, which derivation produced a path
//! (its deriver, as Nix recorded it when it built or substituted the path), and what a
//! derivation declares.

use crate::Derivation;
use crate::derivation::parse_show_derivation;
use crate::runner::{Nix, NixError, tail};
use std::collections::BTreeMap;
use std::process::Stdio;
use tokio::process::Command;

impl Nix {
    /// The derivations in the closures of `drvs`, with their inputs, as Nix prints them
    /// (`show_derivations` reads the files itself and asks this only when it cannot).
    pub async fn show_derivations_nix(&self, drvs: &[String]) -> Result<Vec<Derivation>, NixError> {
        let mut all = BTreeMap::new();
        for chunk in drvs.chunks(500) {
            let mut c = self.nix_cmd();
            c.args(["show-derivation", "-r"]);
            c.args(chunk);
            let out = self.run_json(c, 0).await?;
            for d in parse_show_derivation(&out)
                .map_err(|e| NixError::Infra(format!("cannot parse derivations: {e}")))?
            {
                all.insert(d.path.clone(), d);
            }
        }
        Ok(all.into_values().collect())
    }

    /// The derivations in the closures of `drvs`, with their inputs, sorted by path. Read
    /// from the store's files in-process; Nix is asked only for a file this cannot read (a
    /// format it does not know).
    pub async fn show_derivations(&self, drvs: &[String]) -> Result<Vec<Derivation>, NixError> {
        let list = drvs.to_vec();
        match tokio::task::spawn_blocking(move || crate::aterm::closure(&list)).await {
            Ok(Ok(all)) => return Ok(all),
            Ok(Err(e)) => tracing::debug!("asking Nix for derivations: {e}"),
            Err(e) => tracing::debug!("asking Nix for derivations: {e}"),
        }
        self.show_derivations_nix(drvs).await
    }

    /// One derivation (not its inputs), read like `show_derivations`.
    pub async fn derivation(&self, drv: &str) -> Result<Derivation, NixError> {
        let path = drv.to_string();
        if let Ok(Ok(d)) = tokio::task::spawn_blocking(move || crate::aterm::read(&path)).await {
            return Ok(d.to_derivation(drv));
        }
        self.show_derivations_nix(&[drv.to_string()])
            .await?
            .into_iter()
            .find(|d| d.path == drv)
            .ok_or_else(|| NixError::Infra(format!("Nix does not show derivation {drv}")))
    }

    /// Opens the store once, so that a fresh one has its database before several Nix
    /// processes start at once (Nix 2.8 racing to create it says the schema "is corrupt").
    /// Agents sharing a fresh store (`nixfarm local`) open it at once, and Nix 2.8 creating
    /// its directories fails in all but one ("creating symlink ... File exists"): tried again,
    /// the store is there by then.
    pub async fn open_store(&self) -> Result<(), NixError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.check_validity(&[]).await {
                Ok(_) => return Ok(()),
                Err(e) if tries >= 4 => return Err(e),
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50 * tries)).await;
                }
            }
        }
    }

    /// Which of `paths` are not valid in the store: asked of a pooled daemon when there is
    /// one, else in one `nix-store` call per 2,000.
    pub async fn invalid_paths(&self, paths: &[String]) -> Result<Vec<String>, NixError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(r) = self.invalid_paths_daemon(paths).await {
            return r;
        }
        let mut out = Vec::new();
        for chunk in paths.chunks(2000) {
            out.extend(self.check_validity(chunk).await?);
        }
        Ok(out)
    }

    /// `nix-store --check-validity --print-invalid PATHS`: the invalid ones.
    async fn check_validity(&self, paths: &[String]) -> Result<Vec<String>, NixError> {
        let out = self
            .nix_store_out(&["--check-validity", "--print-invalid"], paths)
            .await?;
        Ok(out.lines().map(String::from).collect())
    }

    /// `nix-store ARGS PATHS`: what it printed; its failure, with the end of what it said on
    /// standard error, is an error.
    async fn nix_store_out(&self, args: &[&str], paths: &[String]) -> Result<String, NixError> {
        let o = Command::new(&self.nix_store)
            .args(args)
            .args(paths)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| NixError::Infra(format!("cannot run nix-store: {e}")))?;
        if !o.status.success() {
            return Err(NixError::Infra(format!(
                "nix-store {} failed: {}",
                args.join(" "),
                tail(&String::from_utf8_lossy(&o.stderr), 500)
            )));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
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

    /// `nix-store --delete PATHS`: removes them from the store unless something still
    /// needs them (a root, a path referring to them). Idle build daemons are stopped first:
    /// their temporary roots (what they fetched) would keep the paths alive.
    pub async fn delete_paths(&self, paths: &[String]) -> Result<(), NixError> {
        if let Some(pool) = &self.daemon {
            pool.close_idle();
        }
        let mut last = Ok(());
        // A stopped daemon's roots count until it has exited: a few tries, briefly apart.
        for _ in 0..5 {
            last = self.nix_store_out(&["--delete"], paths).await.map(|_| ());
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        last
    }

    /// [`Nix::deriver`] for many paths, all valid here, with one `nix-store` per 1,000 paths:
    /// per path, in order, the recorded deriver (None: unknown). An error when Nix answers
    /// anything but one line per path.
    pub async fn derivers(&self, paths: &[String]) -> Result<Vec<Option<String>>, NixError> {
        let mut all = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(1000) {
            let text = self.nix_store_out(&["--query", "--deriver"], chunk).await?;
            let lines: Vec<&str> = text.lines().collect();
            if lines.len() != chunk.len() {
                return Err(NixError::Infra(format!(
                    "nix-store --query --deriver answered {} lines for {} paths",
                    lines.len(),
                    chunk.len()
                )));
            }
            all.extend(lines.into_iter().map(|l| {
                let l = l.trim();
                (l.starts_with('/') && l.ends_with(".drv")).then(|| l.to_string())
            }));
        }
        Ok(all)
    }
}
