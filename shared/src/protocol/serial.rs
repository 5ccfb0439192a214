//! Opening the serial port of a link, for every program on either end: one place that says why
//! a port cannot be opened (a missing port lists the ones there are, a busy one the processes
//! that hold it).

use alloc::borrow::ToOwned;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use serialport::TTYPort;

/// Why [`open`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// No such file; `present` lists the serial devices there are.
    Missing { path: PathBuf, present: Vec<String> },
    /// The driver refused; `holders` are the processes that have the port open.
    Refused {
        path: PathBuf,
        error: serialport::Error,
        holders: Vec<String>,
    },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { path, present } => {
                let present = if present.is_empty() {
                    "none".to_string()
                } else {
                    present.join(", ")
                };
                write!(
                    f,
                    "serial port {} does not exist; serial ports here: {present}",
                    path.display()
                )
            }
            Self::Refused {
                path,
                error,
                holders,
            } => {
                write!(f, "cannot open the serial port {}: {error}", path.display())?;
                if !holders.is_empty() {
                    write!(f, "; it is held by {}", holders.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

impl core::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Refused { error, .. } => Some(error),
            Self::Missing { .. } => None,
        }
    }
}

impl From<OpenError> for std::io::Error {
    fn from(e: OpenError) -> Self {
        let kind = match &e {
            OpenError::Missing { .. } => std::io::ErrorKind::NotFound,
            OpenError::Refused { .. } => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// Opens `path` at `baud`, 8N1 without flow control; reads and writes give up after `timeout`.
pub fn open(path: &Path, baud: u32, timeout: Duration) -> Result<TTYPort, OpenError> {
    if !path.exists() {
        return Err(OpenError::Missing {
            path: path.to_owned(),
            present: serial_ports(),
        });
    }
    serialport::new(path.to_string_lossy(), baud)
        .timeout(timeout)
        .open_native()
        .map_err(|error| OpenError::Refused {
            path: path.to_owned(),
            error,
            holders: holders(path),
        })
}

/// Serial devices present, for an error message.
fn serial_ports() -> Vec<String> {
    const PREFIXES: [&str; 5] = [
        "/dev/ttyUSB",
        "/dev/ttyACM",
        "/dev/ttyAMA",
        "/dev/ttyS0",
        "/dev/serial",
    ];
    let mut found: Vec<String> = std::fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| PREFIXES.iter().any(|pre| p.starts_with(pre)))
        .collect();
    found.sort();
    found
}

/// Processes that have `path` open (from /proc; empty where that cannot be read).
fn holders(path: &Path) -> Vec<String> {
    let Ok(target) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_dir.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let holds = std::fs::read_dir(proc_dir.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target));
        if holds {
            let comm = std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
            out.push(alloc::format!("{} (pid {pid})", comm.trim()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_port_is_named_with_the_ports_there_are() {
        let e = open(
            Path::new("/dev/petcam-no-such-port"),
            9600,
            Duration::from_millis(10),
        )
        .unwrap_err();
        let text = alloc::format!("{e}");
        assert!(
            text.starts_with(
                "serial port /dev/petcam-no-such-port does not exist; serial ports here: "
            ),
            "{text}"
        );
        assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_that_is_not_a_port_is_refused_with_its_holders() {
        let dir = std::env::temp_dir().join(alloc::format!("petcam-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-tty");
        let held = std::fs::File::create(&path).unwrap();
        let e = open(&path, 9600, Duration::from_millis(10)).unwrap_err();
        let OpenError::Refused { holders, .. } = &e else {
            panic!("{e}")
        };
        // This process holds the file open.
        assert!(
            holders
                .iter()
                .any(|h| h.contains(&alloc::format!("pid {}", std::process::id()))),
            "{holders:?}"
        );
        assert!(alloc::format!("{e}").contains("; it is held by "), "{e}");
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
