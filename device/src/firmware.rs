//! Firmware (the `petcam-device` binary itself) in the state directory: install, trial start,
//! confirmation, rollback.
//!
//! ```text
//! firmware/<sha256>.bin   received binaries (the current one and the one before it)
//! firmware/current        symlink to the binary `petcam-device launch` runs
//! firmware/previous       symlink to the one it replaced
//! firmware/current.json   version and sha256 of `current`
//! firmware/trial.json     present while a new binary has not yet proved itself healthy
//! ```
//!
//! A new binary is installed by pointing `current` at it (a symlink renamed over the old one,
//! so the switch is atomic) after writing `trial.json`. The process then exits and systemd
//! starts `petcam-device launch` again, which runs `current` and counts the start in
//! `trial.json`. A binary that stays up for its grace period confirms itself by removing
//! `trial.json`. If `launch` finds a trial that already had its start and was never confirmed
//! (the new binary crashed, hung, or was killed), it points `current` back at `previous` and
//! runs that instead. `launch` itself is the binary installed with the package and is never
//! replaced over the link, as a bootloader is not.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::state_dir::{sync_dir, Entry};

/// Exit status after a new binary was installed: the service manager starts the program
/// again (`RestartForceExitStatus=75` in device/petcam-device.service), now the new binary.
pub const EXIT_RESTART: u8 = 75;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Trial {
    firmware: Entry,
    previous: Option<Entry>,
    /// Starts of the new binary so far.
    starts: u32,
}

/// What [`FirmwareStore::boot`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// No firmware was ever installed over the link: run the packaged binary.
    Packaged,
    /// Run `current`, confirmed.
    Current(PathBuf),
    /// Run `current`, a new binary on trial.
    Trial(PathBuf),
    /// The binary on trial never confirmed itself; back to the previous one (`None`: the
    /// packaged binary).
    RolledBack { failed: Entry, to: Option<PathBuf> },
}

/// The `firmware/` folder of the state directory.
#[derive(Debug, Clone)]
pub struct FirmwareStore {
    dir: PathBuf,
}

fn write_synced(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

impl FirmwareStore {
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("firmware");
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn link(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Option<T> {
        serde_json::from_str(&fs::read_to_string(self.dir.join(name)).ok()?).ok()
    }

    /// The installed firmware (`None`: the packaged binary runs).
    pub fn current(&self) -> Option<Entry> {
        fs::symlink_metadata(self.link("current")).ok()?;
        self.read_json("current.json")
    }

    /// Whether a new binary is on trial.
    pub fn on_trial(&self) -> bool {
        self.dir.join("trial.json").exists()
    }

    /// Points `name` at `target` (a file in this folder, or `None` to remove the link),
    /// atomically: a new link renamed over the old.
    fn point(&self, name: &str, target: Option<&str>) -> io::Result<()> {
        let link = self.link(name);
        match target {
            Some(t) => {
                let tmp = self.link(&format!("{name}.tmp"));
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(t, &tmp)?;
                fs::rename(&tmp, &link)?;
            }
            None => {
                let _ = fs::remove_file(&link);
            }
        }
        sync_dir(&self.dir)
    }

    /// Installs a received, verified and self-tested binary (`staged`) as `current`, on trial.
    pub fn install(&self, staged: &Path, entry: Entry) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("{}.bin", entry.sha256);
        let target = self.dir.join(&name);
        fs::set_permissions(staged, fs::Permissions::from_mode(0o755))?;
        fs::rename(staged, &target)?;
        sync_dir(&self.dir)?;
        let previous = self.current();
        let trial = Trial {
            firmware: entry.clone(),
            previous: previous.clone(),
            starts: 0,
        };
        write_synced(
            &self.dir.join("trial.json"),
            &serde_json::to_string_pretty(&trial)?,
        )?;
        if let Some(p) = &previous {
            self.point("previous", Some(&format!("{}.bin", p.sha256)))?;
        }
        // The switch: from here `launch` runs the new binary.
        self.point("current", Some(&name))?;
        write_synced(
            &self.dir.join("current.json"),
            &serde_json::to_string_pretty(&entry)?,
        )?;
        sync_dir(&self.dir)
    }

    /// At start, before running anything: which binary to run, rolling back a trial that
    /// already had `max_starts` starts without confirming.
    pub fn boot(&self, max_starts: u32) -> io::Result<Boot> {
        let Some(mut trial) = self.read_json::<Trial>("trial.json") else {
            return Ok(match self.current() {
                Some(_) => Boot::Current(self.link("current")),
                None => Boot::Packaged,
            });
        };
        if trial.starts >= max_starts {
            let to = match &trial.previous {
                Some(p) => {
                    self.point("current", Some(&format!("{}.bin", p.sha256)))?;
                    write_synced(
                        &self.dir.join("current.json"),
                        &serde_json::to_string_pretty(p)?,
                    )?;
                    Some(self.link("current"))
                }
                None => {
                    self.point("current", None)?;
                    let _ = fs::remove_file(self.dir.join("current.json"));
                    None
                }
            };
            fs::remove_file(self.dir.join("trial.json"))?;
            sync_dir(&self.dir)?;
            return Ok(Boot::RolledBack {
                failed: trial.firmware,
                to,
            });
        }
        trial.starts += 1;
        write_synced(
            &self.dir.join("trial.json"),
            &serde_json::to_string_pretty(&trial)?,
        )?;
        Ok(Boot::Trial(self.link("current")))
    }

    /// The binary on trial has run its grace period: it stays. Binaries that neither
    /// `current` nor `previous` names are removed.
    pub fn confirm(&self) -> io::Result<()> {
        if self.on_trial() {
            fs::remove_file(self.dir.join("trial.json"))?;
            sync_dir(&self.dir)?;
        }
        let keep: Vec<PathBuf> = ["current", "previous"]
            .iter()
            .filter_map(|l| fs::read_link(self.link(l)).ok())
            .collect();
        for f in fs::read_dir(&self.dir)?.flatten() {
            let name = PathBuf::from(f.file_name());
            if name.extension().is_some_and(|e| e == "bin") && !keep.contains(&name) {
                let _ = fs::remove_file(f.path());
            }
        }
        Ok(())
    }
}

/// Confirms a binary on trial once the program has run `grace` without failing.
#[derive(Debug)]
pub struct Health {
    firmware: Option<FirmwareStore>,
    confirm_at: Instant,
}

impl Health {
    pub fn new(state_dir: &Path, grace: Duration) -> Self {
        let firmware = FirmwareStore::open(state_dir)
            .ok()
            .filter(FirmwareStore::on_trial);
        if firmware.is_some() {
            tracing::info!("running a newly flashed binary on trial for {grace:?}");
        }
        Self {
            firmware,
            confirm_at: Instant::now() + grace,
        }
    }

    /// Call now and then; confirms once the grace period is over.
    pub fn tick(&mut self) {
        if self.firmware.is_some() && Instant::now() >= self.confirm_at {
            if let Some(fw) = self.firmware.take() {
                match fw.confirm() {
                    Ok(()) => tracing::info!("the new binary ran its grace period: confirmed"),
                    Err(e) => tracing::warn!("cannot confirm the new binary: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(dir: &Path, name: &str, body: &str) -> (PathBuf, Entry) {
        let p = dir.join(name);
        fs::write(&p, body).unwrap();
        let sha: String = format!("{:0>64}", name.len().to_string() + name);
        (
            p,
            Entry {
                version: name.into(),
                sha256: sha.chars().take(64).collect(),
                size: body.len() as u64,
            },
        )
    }

    #[test]
    fn a_trial_that_never_confirms_is_rolled_back_and_a_confirmed_one_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let fw = FirmwareStore::open(tmp.path()).unwrap();
        assert_eq!(fw.boot(1).unwrap(), Boot::Packaged);

        let (a, ea) = staged(tmp.path(), "a", "#!/bin/sh\n");
        fw.install(&a, ea.clone()).unwrap();
        assert!(matches!(fw.boot(1).unwrap(), Boot::Trial(_)));
        fw.confirm().unwrap();
        assert_eq!(fw.current(), Some(ea.clone()));
        assert!(matches!(fw.boot(1).unwrap(), Boot::Current(_)));

        // B starts once and never confirms: the next start goes back to A.
        let (b, eb) = staged(tmp.path(), "bb", "#!/bin/sh\nexit 1\n");
        fw.install(&b, eb.clone()).unwrap();
        assert_eq!(fw.current(), Some(eb.clone()));
        assert!(matches!(fw.boot(1).unwrap(), Boot::Trial(_)));
        match fw.boot(1).unwrap() {
            Boot::RolledBack { failed, to } => {
                assert_eq!(failed, eb);
                assert!(to.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fw.current(), Some(ea.clone()));
        let target = fs::read_link(tmp.path().join("firmware/current")).unwrap();
        assert_eq!(target, PathBuf::from(format!("{}.bin", ea.sha256)));
        assert!(matches!(fw.boot(1).unwrap(), Boot::Current(_)));
        fw.confirm().unwrap();
        // The failed binary is gone once nothing names it.
        assert!(!tmp
            .path()
            .join(format!("firmware/{}.bin", eb.sha256))
            .exists());
    }
}
