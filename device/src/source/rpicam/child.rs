//! The `rpicam-vid` child process: started, read frame by frame with timeouts, stopped.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::RpicamSettings;
use crate::source::camera::Camera;
use crate::source::{I420Layout, PixelFormat};

/// How long the first frame may take: libcamera starts the sensor and runs its control
/// algorithms for a few frames first.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A running camera that sends nothing for this long is stuck; it is restarted.
const FRAME_TIMEOUT: Duration = Duration::from_secs(3);
/// The lines of the child's stderr kept for the error message when it dies.
const STDERR_TAIL: usize = 6;

/// A running `rpicam-vid` and the frame last read from it.
struct RpicamCamera {
    child: Child,
    stdout: ChildStdout,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// The thread reading stderr; it ends when the child's stderr closes.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    bin: String,
    layout: I420Layout,
    frame: Vec<u8>,
    /// The first frame was read by `open` and is handed out by the first `grab`.
    first_pending: bool,
}

/// Starts `rpicam-vid` and waits for its first frame, so a camera that is missing or busy is
/// reported as unavailable (and retried with back-off) rather than as a stream lost at once.
pub fn open(settings: &RpicamSettings) -> io::Result<Box<dyn Camera>> {
    let layout = settings.layout().map_err(io::Error::other)?;
    let bin = settings.bin.display().to_string();
    let mut cmd = Command::new(&settings.bin);
    cmd.args(settings.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl, getppid and raise are
    // async-signal-safe and nothing here allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nothing would kill us.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound {
            "; install rpicam-apps (`sudo apt install rpicam-apps`) or name the program with \
             --rpicam-bin (libcamera-vid on bullseye)"
        } else {
            ""
        };
        io::Error::new(e.kind(), format!("cannot start {bin}: {e}{hint}"))
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (stderr, stderr_reader) =
        forward_stderr(child.stderr.take().expect("stderr is piped"), &bin);
    tracing::info!(
        "started {bin} (pid {}) for {}x{} I420, stride {}, {} bytes a frame",
        child.id(),
        layout.width,
        layout.height,
        layout.stride,
        layout.frame_len()
    );
    let mut camera = RpicamCamera {
        child,
        stdout,
        stderr,
        stderr_reader,
        stop: settings.stop.clone(),
        bin,
        frame: vec![0; layout.frame_len()],
        layout,
        first_pending: true,
    };
    camera.read_frame(STARTUP_TIMEOUT)?;
    Ok(Box::new(camera))
}

/// Logs the child's stderr line by line and keeps the last few lines for error messages.
fn forward_stderr(
    stderr: std::process::ChildStderr,
    bin: &str,
) -> (
    Arc<Mutex<VecDeque<String>>>,
    Option<std::thread::JoinHandle<()>>,
) {
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
    let keep = tail.clone();
    let name = bin.to_owned();
    let spawned = std::thread::Builder::new()
        .name("rpicam-stderr".into())
        .spawn(move || {
            let mut reader = io::BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                line.clear();
                if text.is_empty() {
                    continue;
                }
                if text.contains("ERROR") || text.contains("WARN") {
                    tracing::warn!("{name}: {text}");
                } else {
                    tracing::info!("{name}: {text}");
                }
                let mut tail = keep.lock().expect("stderr tail");
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
        });
    match spawned {
        Ok(handle) => (tail, Some(handle)),
        Err(e) => {
            tracing::warn!("cannot start a thread for {bin}'s messages: {e}");
            (tail, None)
        }
    }
}

impl RpicamCamera {
    /// Reads exactly one frame into `self.frame`, giving up after `timeout` without bytes.
    fn read_frame(&mut self, timeout: Duration) -> io::Result<()> {
        let fd = self.stdout.as_raw_fd();
        let mut filled = 0;
        while filled < self.frame.len() {
            if !wait_readable(fd, timeout, &self.stop)? {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "stopping"));
                }
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no frame from {} for {:.0} s",
                        self.bin,
                        timeout.as_secs_f64()
                    ),
                ));
            }
            match self.stdout.read(&mut self.frame[filled..]) {
                Ok(0) => return Err(self.exited(filled)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Why the stream ended: the child's exit status and its last messages.
    fn exited(&mut self, partial: usize) -> io::Error {
        // It closed its stdout; its exit follows at once, or it is killed on drop.
        let deadline = Instant::now() + Duration::from_millis(500);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break None,
            }
        };
        // Its last words may still be in the pipe: let the reader reach the end of stderr.
        if status.is_some() {
            while self
                .stderr_reader
                .as_ref()
                .is_some_and(|h| !h.is_finished())
                && Instant::now() < deadline + Duration::from_millis(500)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let how = match status {
            Some(s) => format!("exited ({s})"),
            None => "closed its output".to_owned(),
        };
        let cut = if partial > 0 {
            format!(" {partial} bytes into a frame,")
        } else {
            String::new()
        };
        let tail = self.stderr.lock().expect("stderr tail");
        let said = match tail.back() {
            Some(last) => format!("; it said: {last}"),
            None => String::new(),
        };
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} {how}{cut}{said}", self.bin),
        )
    }
}

/// Waits until `fd` has bytes (or end of file) to read; `false` on timeout or once `stop` is
/// set (looked at every 100 ms).
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration, stop: &AtomicBool) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let left = left.min(Duration::from_millis(100));
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => {}
            n if n > 0 => return Ok(true),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl Camera for RpicamCamera {
    fn grab(&mut self) -> io::Result<&[u8]> {
        if self.first_pending {
            self.first_pending = false;
        } else {
            self.read_frame(FRAME_TIMEOUT)?;
        }
        Ok(&self.frame)
    }

    fn format(&self) -> (PixelFormat, u32, u32) {
        (
            PixelFormat::I420(self.layout),
            self.layout.width,
            self.layout.height,
        )
    }
}

impl Drop for RpicamCamera {
    /// Stops the child: SIGTERM, so libcamera releases the camera in order, then SIGKILL if it
    /// has not exited within a second. Always reaped.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet, so not reused.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
        }
        match self.child.wait() {
            Ok(status) => tracing::info!("{} (pid {}) ended: {status}", self.bin, self.child.id()),
            Err(e) => tracing::warn!("cannot reap {}: {e}", self.bin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A shell script standing in for rpicam-vid.
    fn script(body: &str) -> (tempfile::TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rpicam-vid");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, path)
    }

    fn small(bin: PathBuf) -> RpicamSettings {
        RpicamSettings {
            bin,
            camera: None,
            width: 4,
            height: 2,
            fps: 30,
            stride: Some(8),
            extra_args: Vec::new(),
            stop: Arc::default(),
        }
    }

    #[test]
    fn frames_are_cut_at_the_frame_size_and_a_dead_child_is_explained() {
        // 2 frames of 8*2 + 2*4*1 = 24 bytes, written in odd pieces, then an error and exit 3.
        let (_dir, bin) = script(
            "head -c 24 /dev/zero | tr '\\0' 'a'; head -c 10 /dev/zero | tr '\\0' 'b'; \
             sleep 0.1; head -c 14 /dev/zero | tr '\\0' 'b'; \
             echo 'ERROR: *** no cameras available ***' >&2; exit 3",
        );
        let mut camera = open(&small(bin)).unwrap();
        assert_eq!(camera.grab().unwrap(), [b'a'; 24]);
        assert_eq!(camera.grab().unwrap(), [b'b'; 24]);
        let err = camera.grab().unwrap_err().to_string();
        assert!(
            err.contains("exit status: 3") && err.contains("no cameras available"),
            "{err}"
        );
    }

    #[test]
    fn a_child_that_dies_before_its_first_frame_fails_the_open() {
        let (_dir, bin) = script("echo 'ERROR: *** no cameras available ***' >&2; exit 255");
        let err = open(&small(bin)).err().unwrap().to_string();
        assert!(err.contains("no cameras available"), "{err}");
        let err = open(&small("/nonexistent/rpicam-vid".into()))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("rpicam-apps") && err.contains("--rpicam-bin"),
            "{err}"
        );
    }

    #[test]
    fn a_stalled_child_is_stopped_when_dropped() {
        // One frame, then silence: the camera is dropped as a lost one would be, and the
        // child (which ignores nothing) must be gone afterwards.
        let (dir, bin) = script(&format!(
            "echo $$ > {}/pid; head -c 24 /dev/zero; exec sleep 600",
            "$(dirname \"$0\")"
        ));
        let mut camera = open(&small(bin)).unwrap();
        camera.grab().unwrap();
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(camera);
        // Reaped by drop: the pid no longer names our child.
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "rpicam-vid stand-in {pid} survived");
    }
}
