//! Helpers for the tests that run the real `petcam-device` inside the test VM (`tools/vm`, see
//! `tests/vm/README.md`): whether the VM can run here, a share folder holding the binary and
//! what it needs, and `tools/vm run` either to completion or as a child to talk to while it runs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::binary;

/// `tools/vm` of this checkout.
pub fn tool() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/vm")
}

/// `tools/vm build`, once per test process, before the first run: on a fresh machine it
/// installs the host packages and builds the VM (about 30 s, then cached). Tests run in
/// parallel; several first runs at once would each start apt-get, and only one can hold
/// dpkg's lock.
fn build() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(tool())
            .arg("build")
            .status()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tool().display()));
        assert!(
            status.success(),
            "`tools/vm build` failed ({status}); see above"
        );
    });
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Whether the VM tests can run. Without `CI` set they are skipped (with a message) when
/// `qemu-system-x86_64` or apt/dpkg are missing; under CI they always run, and `tools/vm`
/// installs what the host lacks with apt-get (or fails saying what is missing).
pub fn available() -> bool {
    let missing: Vec<&str> = ["qemu-system-x86_64", "dpkg", "apt-get"]
        .into_iter()
        .filter(|c| !on_path(c))
        .collect();
    if missing.is_empty() || std::env::var_os("CI").is_some() {
        return true;
    }
    eprintln!(
        "skipping: the VM tests need {} (a Debian amd64 host; `tools/vm build` installs qemu)",
        missing.join(", ")
    );
    false
}

/// A folder of the test binary's own, under the target folder, for files shared between tests
/// and between runs (the stripped binary).
fn work_dir() -> PathBuf {
    let dir = binary("petcam-device")
        .parent()
        .expect("target folder")
        .join("petcam-vm");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// `target/<profile>/petcam-device` without its debug information (the debug build is about
/// 670 MB, stripped about 40 MB: far less to copy and for the guest to page in over 9p). Made
/// again whenever the binary is newer than the stripped copy.
pub fn device_binary() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = binary("petcam-device");
    let dst = work_dir().join("petcam-device");
    if mtime(&dst).is_some_and(|d| mtime(&src).is_some_and(|s| d > s)) {
        return dst;
    }
    // A new name, then a rename: another test process never sees a half-written file.
    let tmp = dst.with_extension(format!("tmp.{}", std::process::id()));
    let out = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run strip (binutils) on {}: {e}", src.display()));
    assert!(
        out.status.success(),
        "strip {} failed: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &dst).unwrap();
    dst
}

/// A host folder shared with the guest (`--share`, `/mnt/host`), removed when dropped.
#[derive(Debug)]
pub struct Share {
    path: PathBuf,
}

impl Share {
    /// An empty share under the system's temporary folder, named after `name`.
    pub fn new(name: &str) -> Share {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "petcam-vm-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        // qemu splits its options at commas; tools/vm refuses such paths.
        assert!(!path.to_string_lossy().contains(','), "{}", path.display());
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Share { path }
    }

    /// A share holding the stripped `petcam-device` as `petcam-device` (run it in the guest as
    /// `./petcam-device`; `tools/vm` carries in its shared libraries).
    pub fn with_device(name: &str) -> Share {
        let share = Share::new(name);
        share.add(&device_binary(), "petcam-device");
        share
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies `src` into the share as `name` (which may hold folders); returns the host path.
    pub fn add(&self, src: &Path, name: &str) -> PathBuf {
        let dst = self.path.join(name);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::copy(src, &dst)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", src.display(), dst.display()));
        dst
    }

    /// Reads a file the guest wrote into the share.
    pub fn read(&self, name: &str) -> String {
        let p = self.path.join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a finished `tools/vm run` gave back.
#[derive(Debug)]
pub struct VmOutput {
    /// The status of `tools/vm`: the guest command's own, 124 on `--timeout`, 125 when the VM
    /// failed, 128+N after signal N.
    pub status: ExitStatus,
    /// The guest command's stdout.
    pub stdout: String,
    /// The guest console, the command's stderr and `tools/vm`'s own `vm:` lines.
    pub stderr: String,
}

impl VmOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, with both streams, unless the guest command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "tools/vm run: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// `tools/vm run [OPTIONS] -- COMMAND`, built up like a `Command`.
#[derive(Debug)]
pub struct Vm {
    cmd: Command,
    timeout: bool,
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

impl Vm {
    pub fn new() -> Vm {
        let mut cmd = Command::new(tool());
        cmd.arg("run");
        Vm {
            cmd,
            timeout: false,
        }
    }

    /// `--share`: the folder is `/mnt/host` in the guest, and the command runs there.
    pub fn share(&mut self, share: &Share) -> &mut Self {
        self.cmd.arg("--share").arg(share.path());
        self
    }

    /// Any other `tools/vm run` options, e.g. `["--loopback"]`, `["--gpio-lines", "8"]`.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in args {
            if a.as_ref() == "--timeout" {
                self.timeout = true;
            }
            self.cmd.arg(a);
        }
        self
    }

    fn command(&mut self, guest: &str) -> &mut Command {
        build();
        // A hung guest must not hang the test run: tools/vm SIGKILLs qemu after this (status
        // 124), unless the caller chose its own --timeout.
        if !self.timeout {
            self.cmd.args(["--timeout", "300"]);
            self.timeout = true;
        }
        self.cmd.arg("--").arg(guest);
        eprintln!("$ {:?}", self.cmd);
        &mut self.cmd
    }

    /// Boots the VM, runs `guest` (a shell command line) and waits for the VM to end.
    pub fn run(&mut self, guest: &str) -> VmOutput {
        self.spawn(guest).wait()
    }

    /// Boots the VM and runs `guest` in it, returning at once: talk to it while it runs (the
    /// serial pty, the share, `--pidfile` for a power cut), then [`Running::wait`].
    pub fn spawn(&mut self, guest: &str) -> Running {
        let started = Instant::now();
        let mut child = self
            .command(guest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", tool().display()));
        let mut stdout = child.stdout.take().expect("piped stdout");
        let out = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            s
        });
        let err = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let e = err.clone();
        let err_thread = std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr);
            let mut line = Vec::new();
            while lines.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line);
                eprint!("[vm {:5.1}s] {text}", started.elapsed().as_secs_f64());
                e.0.lock().unwrap().push_str(&text);
                e.1.notify_all();
                line.clear();
            }
        });
        Running {
            child: Some(child),
            stdout: Some(out),
            stderr: err,
            stderr_thread: Some(err_thread),
        }
    }
}

/// Sends `signal` (e.g. `"TERM"`, `"KILL"`) to process `pid` with kill(1).
pub fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The pid in `pidfile` (`tools/vm run --pidfile`, qemu's: SIGKILL it to cut the power), once
/// the file is there; panics after `within`.
pub fn read_pid(pidfile: &Path, within: Duration) -> u32 {
    let end = Instant::now() + within;
    loop {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < end,
            "no pid in {} after {within:?}",
            pidfile.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `tools/vm run` in progress. Dropping it kills the VM (SIGTERM to `tools/vm`: a power cut).
#[derive(Debug)]
pub struct Running {
    child: Option<Child>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Arc<(Mutex<String>, Condvar)>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// `tools/vm`'s pid (signals to it kill qemu at once).
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The stderr seen so far.
    pub fn stderr(&self) -> String {
        self.stderr.0.lock().unwrap().clone()
    }

    /// Waits until a stderr line contains `needle` and returns that line; `None` when the VM
    /// ended (or `within` passed) without one.
    pub fn wait_for_stderr(&self, needle: &str, within: Duration) -> Option<String> {
        self.wait_for_stderr_after(0, |l| l.contains(needle), within)
            .map(|(_, line)| line)
    }

    /// The host end of the guest's `/dev/ttyS1`, for a VM started with `--serial-pty`.
    pub fn serial_pty(&self) -> PathBuf {
        let line = self
            .wait_for_stderr("vm: ttyS1 is ", Duration::from_secs(120))
            .unwrap_or_else(|| {
                panic!(
                    "no `vm: ttyS1 is` line (was --serial-pty given?)\n{}",
                    self.stderr()
                )
            });
        PathBuf::from(line.rsplit(' ').next().expect("pty path").trim())
    }

    /// Waits for the VM to end and returns what it gave back.
    pub fn wait(mut self) -> VmOutput {
        let status = self
            .child
            .take()
            .expect("running")
            .wait()
            .expect("wait for tools/vm");
        let stdout = self
            .stdout
            .take()
            .expect("stdout")
            .join()
            .unwrap_or_default();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        let stderr = self.stderr();
        VmOutput {
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
            }
            let _ = child.wait();
        }
    }
}

/// A small cat/dog model (EfficientNet-Lite0 at 128x128) trained once per test process on 6 + 6
/// Kaggle photos (seconds on the host), with those photos; `None` (with a message) when
/// `../shared` is missing (see [`crate::shared`]).
#[derive(Debug)]
pub struct TinyModel {
    /// The exported `model.onnx`.
    pub model: PathBuf,
    /// The training photos, `cat/` and `dog/`.
    pub photos: PathBuf,
}

/// See [`TinyModel`].
pub fn tiny_model() -> Option<&'static TinyModel> {
    static MODEL: OnceLock<Option<TinyModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let (data, weights) = crate::photos_and_weights()?;
            // Kept for the whole process (a static is never dropped): one folder per process,
            // and those of earlier processes are removed here.
            let root = work_dir();
            let mine = format!("model-{}", std::process::id());
            // Only those of processes that have ended: another `cargo test` may share the target
            // folder.
            for e in std::fs::read_dir(&root).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("model-") {
                    if name != mine && !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let dir = root.join(mine);
            let _ = std::fs::remove_dir_all(&dir);
            Some(TinyModel {
                model: crate::train_tiny_model(&data, &weights, &dir),
                photos: dir.join("photos"),
            })
        })
        .as_ref()
}

/// Watching stderr from a point on, for tests that act on console lines as they come (the
/// serial tests time power cuts from the guest's syscall tracepoints).
impl Running {
    /// Bytes of stderr seen so far: a starting point for [`Running::wait_for_stderr_after`].
    pub fn stderr_len(&self) -> usize {
        self.stderr.0.lock().unwrap().len()
    }

    /// Waits for a stderr line that starts at or after byte `from` and satisfies `pred`;
    /// returns the offset just past it (for the next call) and the line. `None` when the VM
    /// ended (or `within` passed) without one.
    pub fn wait_for_stderr_after(
        &self,
        from: usize,
        pred: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Option<(usize, String)> {
        let end = Instant::now() + within;
        let mut text = self.stderr.0.lock().unwrap();
        loop {
            let mut at = from.min(text.len());
            // Lines are pushed whole, so every `\n` past `from` ends one.
            while let Some(nl) = text[at..].find('\n') {
                let line = &text[at..at + nl];
                if pred(line) {
                    return Some((at + nl + 1, line.to_owned()));
                }
                at += nl + 1;
            }
            let now = Instant::now();
            let ended = self.stderr_thread.as_ref().is_none_or(|t| t.is_finished());
            if now >= end || ended {
                return None;
            }
            // Woken by every new line; the timeout also notices the VM ending.
            let wait = (end - now).min(Duration::from_millis(200));
            text = self.stderr.1.wait_timeout(text, wait).unwrap().0;
        }
    }
}
