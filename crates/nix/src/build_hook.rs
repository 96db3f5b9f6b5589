//! A build hook that declines at once. Nix 2.8 starts its build hook (`build-remote`, a
//! second Nix process) for every `nix-store --realise`, only to hear it decline, since the
//! agent builds locally (`builders = ""`): about 40 ms of every build. This hook answers
//! "decline-permanently" (the hook protocol's reply, which every Nix and Lix since 2.0
//! understands) before Nix asks, then drains what Nix sends until Nix drops it.

use crate::runner::Nix;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SCRIPT: &str = "#!/bin/sh\n# nixfarm: build locally; declines every build Nix offers.\necho '# decline-permanently' >&2\nexec cat >/dev/null\n";
const REPLY: &str = "# decline-permanently";

impl Nix {
    /// Writes the declining hook into `dir` and has every build use it, once it has shown
    /// that it runs here (a `noexec` directory, say, leaves Nix's own hook in place).
    pub fn with_declining_hook(mut self, dir: &Path) -> Nix {
        match install(dir) {
            Ok(path) => self.build_hook = Some(path),
            Err(e) => tracing::info!("builds keep Nix's own build hook: {e}"),
        }
        self
    }
}

fn install(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join("nixfarm-build-hook");
    let tmp = dir.join(".nixfarm-build-hook.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(SCRIPT.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let run = || {
        Command::new(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    // A child another thread forked while the script's file was open for writing holds it
    // open until it execs: "text file busy" for a moment.
    let mut tries = 0;
    let out = loop {
        match run() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r.map_err(|e| format!("cannot run {}: {e}", path.display()))?,
        }
    };
    let said = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && said.lines().next() == Some(REPLY) {
        Ok(path)
    } else {
        Err(format!("{} answered {said:?}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_is_installed_and_declines() {
        let dir = tempfile::tempdir().unwrap();
        let nix = Nix::default().with_declining_hook(dir.path());
        let hook = nix.build_hook.clone().unwrap();
        assert!(hook.starts_with(dir.path()));
        // What Nix sees: the reply first, then it may write anything.
        let mut child = Command::new(&hook)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"try\n1\nx86_64-linux\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("{REPLY}\n"));
    }

    #[test]
    fn a_directory_it_cannot_use_leaves_nix_alone() {
        let nix = Nix::default().with_declining_hook(Path::new("/nonexistent/dir"));
        assert!(nix.build_hook.is_none());
    }
}
