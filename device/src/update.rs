//! Receiving models over the link: staging that survives a restart, verification, self-test,
//! and activation that a crash at any point leaves on the complete old or the complete new model.
//!
//! The state directory (`--state-dir`, default `/var/lib/petcam`):
//!
//! ```text
//! staging/model.json   the upload being received: its `Begin` (kind, size, sha256, version, signature)
//! staging/model.part   its bytes so far; the file's length is where a resumed upload continues
//! models/<sha256>.onnx complete, verified models (the active one and the previous one)
//! active.json          which model runs, and the one before it (for rollback)
//! ```
//!
//! Activation renames the staged file into `models/`, then replaces `active.json` by writing a
//! new one beside it, syncing it and renaming it over the old one, syncing the folder after each
//! rename. Until that last rename lands, `active.json` names the old model, whose file is never
//! touched; after it, the new one, already complete and synced. Files that neither entry names
//! are removed afterwards, and found and removed again at the next start if that was cut short.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use petcam_shared::protocol::{Begin, ImageKind, Message, Nack, NackReason, StagedInfo, Status};
use petcam_shared::signing::{self, SignatureError, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::firmware::FirmwareStore;
use crate::infer::ExportedModel;
use crate::state_dir::{from_hex, hex, sync_dir, Entry};
use crate::threads::Threads;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ActiveRecord {
    model: Entry,
    previous: Option<Entry>,
}

/// The `Begin` of the staged upload, as `staging/model.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StagedRecord {
    version: String,
    sha256: String,
    size: u64,
    signature: String,
}

impl StagedRecord {
    fn of(b: &Begin) -> Self {
        Self {
            version: b.version.clone(),
            sha256: hex(&b.sha256),
            size: b.size,
            signature: hex(&b.signature),
        }
    }
}

fn kind_name(kind: ImageKind) -> &'static str {
    match kind {
        ImageKind::Model => "model",
        ImageKind::Firmware => "firmware",
    }
}

/// One step of [`Store::activate`], for tests that stop it part-way, as a power cut would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Rename,
    SyncDir,
    Write,
    SyncFile,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating it if needed) the state directory and finishes any clean-up an
    /// interrupted activation left.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let store = Self {
            dir: dir.to_owned(),
        };
        fs::create_dir_all(store.dir.join("staging"))?;
        fs::create_dir_all(store.dir.join("models"))?;
        let _ = fs::remove_file(store.dir.join("active.json.tmp"));
        store.collect_garbage();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn model_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("models").join(format!("{sha256}.onnx"))
    }

    fn staged_part(&self, kind: ImageKind) -> PathBuf {
        self.dir.join(format!("staging/{}.part", kind_name(kind)))
    }

    fn staged_json(&self, kind: ImageKind) -> PathBuf {
        self.dir.join(format!("staging/{}.json", kind_name(kind)))
    }

    fn record(&self) -> Option<ActiveRecord> {
        let text = fs::read_to_string(self.dir.join("active.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The active model and its file, if one was ever activated.
    pub fn active(&self) -> Option<(Entry, PathBuf)> {
        let r = self.record()?;
        let path = self.model_path(&r.model.sha256);
        Some((r.model, path))
    }

    /// The model active before the current one.
    pub fn previous(&self) -> Option<(Entry, PathBuf)> {
        let e = self.record()?.previous?;
        let path = self.model_path(&e.sha256);
        Some((e, path))
    }

    fn staged(&self, kind: ImageKind) -> Option<(StagedRecord, u64)> {
        let text = fs::read_to_string(self.staged_json(kind)).ok()?;
        let rec: StagedRecord = serde_json::from_str(&text).ok()?;
        let len = fs::metadata(self.staged_part(kind))
            .map(|m| m.len())
            .unwrap_or(0);
        let received = len.min(rec.size);
        Some((rec, received))
    }

    fn clear_staging(&self, kind: ImageKind) {
        let _ = fs::remove_file(self.staged_part(kind));
        let _ = fs::remove_file(self.staged_json(kind));
    }

    /// Removes model files that neither the active nor the previous entry names.
    fn collect_garbage(&self) {
        let keep: Vec<String> = self
            .record()
            .map(|r| {
                std::iter::once(r.model)
                    .chain(r.previous)
                    .map(|e| format!("{}.onnx", e.sha256))
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(dir) = fs::read_dir(self.dir.join("models")) {
            for f in dir.flatten() {
                if !keep.iter().any(|k| f.file_name().to_string_lossy() == *k) {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
    }

    /// Makes the complete, verified staged file the active model. `step` is called before
    /// each write, sync and rename; an error from it stops the activation there.
    pub fn activate(
        &self,
        entry: Entry,
        step: &mut dyn FnMut(Step) -> io::Result<()>,
    ) -> io::Result<()> {
        let target = self.model_path(&entry.sha256);
        step(Step::Rename)?;
        fs::rename(self.staged_part(ImageKind::Model), &target)?;
        step(Step::SyncDir)?;
        sync_dir(&self.dir.join("models"))?;
        // Re-activating the active image keeps the rollback target it had.
        let previous = self.record().and_then(|r| {
            if r.model.sha256 == entry.sha256 {
                r.previous
            } else {
                Some(r.model)
            }
        });
        let record = ActiveRecord {
            model: entry,
            previous,
        };
        let tmp = self.dir.join("active.json.tmp");
        step(Step::Write)?;
        let mut f = File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&record)?.as_bytes())?;
        step(Step::SyncFile)?;
        f.sync_all()?;
        drop(f);
        step(Step::Rename)?;
        fs::rename(&tmp, self.dir.join("active.json"))?;
        step(Step::SyncDir)?;
        sync_dir(&self.dir)?;
        self.clear_staging(ImageKind::Model);
        self.collect_garbage();
        Ok(())
    }
}

/// What the device accepts.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `None`: unsigned uploads are accepted (`--allow-unsigned`).
    pub trusted_key: Option<VerifyingKey>,
    pub allow_downgrade: bool,
    /// Largest image accepted, in bytes.
    pub max_size: u64,
    /// The self-test fails a model whose golden inference takes longer than this.
    pub latency_budget_ms: f64,
    /// Threads the self-test loads the model with (the model it loads is the one `run` then
    /// switches to).
    pub threads: Threads,
    /// Labels a new model must have, in order: `run` drives its pins by label.
    pub required_labels: Option<Vec<String>>,
    /// Version of the running binary, for firmware downgrade checks until one is installed.
    pub firmware_version: String,
    /// How long a received binary's `self-test` may take.
    pub firmware_self_test_timeout: std::time::Duration,
}

/// An image that passed its self-test and is now active.
#[derive(Clone)]
pub enum Activated {
    /// A model: `run` switches to `model`, as the self-test loaded it.
    Model {
        entry: Entry,
        path: PathBuf,
        model: Box<ExportedModel>,
    },
    /// A binary, now `firmware/current` on trial: the process should exit so that it starts.
    Firmware { entry: Entry },
}

impl Activated {
    pub fn entry(&self) -> &Entry {
        match self {
            Activated::Model { entry, .. } | Activated::Firmware { entry } => entry,
        }
    }
}

impl std::fmt::Debug for Activated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activated::Model { entry, path, .. } => f
                .debug_struct("Model")
                .field("entry", entry)
                .field("path", path)
                .finish_non_exhaustive(),
            Activated::Firmware { entry } => {
                f.debug_struct("Firmware").field("entry", entry).finish()
            }
        }
    }
}

struct Upload {
    begin: Begin,
    file: File,
    received: u64,
    unsynced: u64,
}

/// The upload state machine: one message in, one reply out.
pub struct Updater {
    store: Store,
    firmware: FirmwareStore,
    policy: Policy,
    upload: Option<Upload>,
    last_error: Option<String>,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("store", &self.store)
            .field("receiving", &self.upload.as_ref().map(|u| u.received))
            .finish()
    }
}

/// Bytes written between syncs of the staging file: what a power cut can cost a resume.
const SYNC_EVERY: u64 = 64 * 1024;

fn nack(reason: NackReason, expected_offset: u64, detail: impl Into<String>) -> Message {
    Message::Nack(Nack {
        reason,
        expected_offset,
        detail: detail.into(),
    })
}

impl Updater {
    pub fn new(store: Store, policy: Policy) -> io::Result<Self> {
        Ok(Self {
            firmware: FirmwareStore::open(&store.dir)?,
            store,
            policy,
            upload: None,
            last_error: None,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The reply to `msg`, and the model it activated if it did. Messages that are not about
    /// uploads get `None`.
    pub fn handle(&mut self, msg: &Message) -> Option<(Message, Option<Activated>)> {
        let reply = match msg {
            Message::Begin(b) => (self.begin(b), None),
            Message::Chunk(c) => (self.chunk(c.offset, &c.data), None),
            Message::Commit => match self.commit() {
                Ok(a) => (
                    Message::Ack {
                        offset: a.entry().size,
                    },
                    Some(a),
                ),
                Err(n) => (*n, None),
            },
            Message::Abort => {
                if let Some(u) = self.upload.take() {
                    self.store.clear_staging(u.begin.kind);
                }
                (Message::Ack { offset: 0 }, None)
            }
            Message::StatusRequest => (Message::Status(self.status()), None),
            _ => return None,
        };
        if let Message::Nack(n) = &reply.0 {
            self.last_error = Some(format!("{:?}: {}", n.reason, n.detail));
        }
        Some(reply)
    }

    pub fn status(&self) -> Status {
        let staged = |kind| match &self.upload {
            Some(u) if u.begin.kind == kind => Some(StagedInfo {
                version: u.begin.version.clone(),
                sha256: u.begin.sha256,
                size: u.begin.size,
                received: u.received,
            }),
            _ => self.store.staged(kind).map(|(r, received)| StagedInfo {
                version: r.version,
                sha256: from_hex(&r.sha256).unwrap_or([0; 32]),
                size: r.size,
                received,
            }),
        };
        Status {
            active_model: self.store.active().map(|(e, _)| e.info()),
            staged_model: staged(ImageKind::Model),
            active_firmware: self.firmware.current().map(|e| e.info()),
            staged_firmware: staged(ImageKind::Firmware),
            last_error: self.last_error.clone(),
        }
    }

    fn begin(&mut self, b: &Begin) -> Message {
        if b.size > self.policy.max_size {
            return nack(
                NackReason::TooLarge,
                0,
                format!(
                    "{} bytes; this device takes at most {}",
                    b.size, self.policy.max_size
                ),
            );
        }
        if let Some(key) = &self.policy.trusted_key {
            if let Err(e) = signing::verify(key, b.kind, &b.version, &b.sha256, &b.signature) {
                let reason = match e {
                    SignatureError::Missing => NackReason::Unsigned,
                    _ => NackReason::BadSignature,
                };
                return nack(reason, 0, e.to_string());
            }
        }
        let active_version = match b.kind {
            ImageKind::Model => self.store.active().map(|(e, _)| e.version),
            ImageKind::Firmware => Some(
                self.firmware
                    .current()
                    .map_or_else(|| self.policy.firmware_version.clone(), |e| e.version),
            ),
        };
        if let Some(active) = active_version {
            if !self.policy.allow_downgrade
                && signing::compare_versions(&b.version, &active).is_lt()
            {
                return nack(
                    NackReason::Downgrade,
                    0,
                    format!(
                        "version {} is older than the active {active} (the device allows downgrades only with --allow-downgrade)",
                        b.version
                    ),
                );
            }
        }
        match self.open_staging(b) {
            Ok(received) => Message::Ack { offset: received },
            Err(e) => nack(
                NackReason::Storage,
                0,
                format!("{}: {e}", self.store.dir.display()),
            ),
        }
    }

    /// Continues the staged upload when it is the same image, else starts a new one.
    fn open_staging(&mut self, b: &Begin) -> io::Result<u64> {
        let record = StagedRecord::of(b);
        if let Some(u) = &self.upload {
            if StagedRecord::of(&u.begin) == record {
                return Ok(u.received);
            }
        }
        self.upload = None;
        let resume = self.store.staged(b.kind).filter(|(r, _)| *r == record);
        let received = match resume {
            Some((_, received)) => received,
            None => {
                self.store.clear_staging(b.kind);
                let tmp = self.store.staged_json(b.kind).with_extension("json.tmp");
                let mut f = File::create(&tmp)?;
                f.write_all(serde_json::to_string_pretty(&record)?.as_bytes())?;
                f.sync_all()?;
                fs::rename(&tmp, self.store.staged_json(b.kind))?;
                sync_dir(&self.store.dir.join("staging"))?;
                0
            }
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(self.store.staged_part(b.kind))?;
        file.set_len(received)?;
        file.seek(SeekFrom::Start(received))?;
        self.upload = Some(Upload {
            begin: b.clone(),
            file,
            received,
            unsynced: 0,
        });
        Ok(received)
    }

    fn chunk(&mut self, offset: u64, data: &[u8]) -> Message {
        let Some(u) = &mut self.upload else {
            return nack(
                NackReason::NoUpload,
                0,
                "no upload in progress (send Begin first)",
            );
        };
        if offset != u.received {
            return nack(
                NackReason::BadOffset,
                u.received,
                format!("chunk at {offset}, expected {}", u.received),
            );
        }
        if offset + data.len() as u64 > u.begin.size {
            return nack(
                NackReason::TooLarge,
                u.received,
                format!(
                    "chunk ends at {}, past the announced size {}",
                    offset + data.len() as u64,
                    u.begin.size
                ),
            );
        }
        let written = u.file.write_all(data).and_then(|()| {
            u.unsynced += data.len() as u64;
            if u.unsynced >= SYNC_EVERY || offset + data.len() as u64 == u.begin.size {
                u.unsynced = 0;
                u.file.sync_data()?;
            }
            Ok(())
        });
        match written {
            Ok(()) => {
                u.received += data.len() as u64;
                Message::Ack { offset: u.received }
            }
            Err(e) => {
                // Where the file really ends is where the next chunk must start.
                let _ = u.file.set_len(u.received);
                let _ = u.file.seek(SeekFrom::Start(u.received));
                nack(NackReason::Storage, u.received, e.to_string())
            }
        }
    }

    fn commit(&mut self) -> Result<Activated, Box<Message>> {
        let Some(u) = self.upload.take() else {
            return Err(Box::new(nack(
                NackReason::NoUpload,
                0,
                "no upload in progress",
            )));
        };
        if u.received != u.begin.size {
            let received = u.received;
            self.upload = Some(u);
            return Err(Box::new(nack(
                NackReason::BadOffset,
                received,
                format!(
                    "commit with {received} of {} bytes",
                    self.upload.as_ref().map_or(0, |u| u.begin.size)
                ),
            )));
        }
        let begin = u.begin.clone();
        let mut file = u.file;
        let bytes = (|| {
            file.sync_all()?;
            file.seek(SeekFrom::Start(0))?;
            let mut bytes = Vec::with_capacity(begin.size as usize);
            file.read_to_end(&mut bytes)?;
            Ok::<_, io::Error>(bytes)
        })()
        .map_err(|e| Box::new(nack(NackReason::Storage, 0, e.to_string())))?;
        drop(file);
        let kind = begin.kind;
        let refuse = |store: &Store, reason, detail: String| {
            store.clear_staging(kind);
            Box::new(nack(reason, 0, detail))
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest != begin.sha256 {
            return Err(refuse(
                &self.store,
                NackReason::HashMismatch,
                format!(
                    "received image hashes to {}, announced {}",
                    hex(&digest),
                    hex(&begin.sha256)
                ),
            ));
        }
        let entry = Entry {
            version: begin.version.clone(),
            sha256: hex(&begin.sha256),
            size: begin.size,
        };
        let staged = self.store.staged_part(kind);
        let storage = |what: &str, e: io::Error| {
            Box::new(nack(NackReason::Storage, 0, format!("{what} failed: {e}")))
        };
        if kind == ImageKind::Firmware {
            if let Err(detail) = firmware_self_test(&staged, &self.store.dir, &self.policy) {
                return Err(refuse(&self.store, NackReason::SelfTestFailed, detail));
            }
            self.firmware
                .install(&staged, entry.clone())
                .map_err(|e| storage("installing the firmware", e))?;
            self.store.clear_staging(kind);
            self.last_error = None;
            return Ok(Activated::Firmware { entry });
        }
        let model = match self_test(&bytes, &staged, &self.policy) {
            Ok(m) => m,
            Err(detail) => return Err(refuse(&self.store, NackReason::SelfTestFailed, detail)),
        };
        self.store
            .activate(entry.clone(), &mut |_| Ok(()))
            .map_err(|e| storage("activation", e))?;
        self.last_error = None;
        let path = self.store.model_path(&entry.sha256);
        Ok(Activated::Model {
            entry,
            path,
            model: Box::new(model),
        })
    }
}

/// Runs a received binary once as `BINARY self-test --state-dir DIR`: it must exit 0 within
/// the policy's time. `Err` has its exit status and the end of what it printed.
fn firmware_self_test(binary: &Path, state_dir: &Path, policy: &Policy) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(binary, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make it executable: {e}"))?;
    let out_path = state_dir.join("staging/self-test.log");
    let log = File::create(&out_path).map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(binary)
        .arg("self-test")
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("it does not start: {e}"))?;
    let deadline = Instant::now() + policy.firmware_self_test_timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`self-test` did not finish within {:?}",
                    policy.firmware_self_test_timeout
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let output = fs::read_to_string(&out_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    if status.success() {
        Ok(())
    } else {
        let tail: String = output.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        Err(format!("`self-test` exited with {status}: {tail}"))
    }
}

/// Loads a received model in tract, runs the golden input stored in its metadata against the
/// stored output, and times that inference: the loaded model, or why it failed.
pub fn self_test(bytes: &[u8], path: &Path, policy: &Policy) -> Result<ExportedModel, String> {
    let model = ExportedModel::from_bytes_with_threads(bytes, path, policy.threads)
        .map_err(|e| format!("the model does not load: {e}"))?;
    if let Some(labels) = &policy.required_labels {
        if &model.labels != labels {
            return Err(format!(
                "its labels {:?} are not the running model's {labels:?}, which the pins are wired to",
                model.labels
            ));
        }
    }
    // The first run allocates; time the second.
    let first = model
        .self_test()
        .map_err(|e| format!("no golden pair: {e}"))?;
    let start = Instant::now();
    let t = model.self_test().map_err(|e| e.to_string())?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if !first.passed || !t.passed {
        return Err(format!(
            "golden output differs by {:.2e} (tolerance {:.1e}): expected {:?}, got {:?}",
            t.max_abs_diff, t.tolerance, t.expected, t.got
        ));
    }
    if ms > policy.latency_budget_ms {
        return Err(format!(
            "golden inference took {ms:.1} ms, over the budget of {:.0} ms",
            policy.latency_budget_ms
        ));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use petcam_shared::protocol::upload::{
        drive, request, DriveError, MemoryLink, Noise, RequestError, Retry, Transport,
        UploadConfig, UploadError, Uploader,
    };

    fn entry(version: &str, bytes: &[u8]) -> Entry {
        Entry {
            version: version.into(),
            sha256: hex(&Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }

    fn stage(store: &Store, bytes: &[u8]) {
        fs::write(store.staged_part(ImageKind::Model), bytes).unwrap();
    }

    /// The active model's bytes, checked against the hash its entry records.
    fn active_bytes(dir: &Path) -> Vec<u8> {
        let store = Store::open(dir).unwrap();
        let (e, path) = store.active().expect("an active model");
        let bytes = fs::read(path).expect("the active model's file");
        assert_eq!(
            hex(&Sha256::digest(&bytes)),
            e.sha256,
            "active file is not what its entry says"
        );
        bytes
    }

    /// What the device runs: each message from the link to its updater, and the reply back;
    /// after `restart_at` bytes it restarts once, with a new updater on the same state folder.
    fn device(
        mut link: MemoryLink,
        dir: PathBuf,
        restart_at: u64,
    ) -> std::thread::JoinHandle<Vec<Message>> {
        let policy = Policy {
            trusted_key: None,
            allow_downgrade: false,
            max_size: 1 << 20,
            latency_budget_ms: 60_000.0,
            threads: Threads::fixed(1),
            required_labels: None,
            firmware_version: "1".into(),
            firmware_self_test_timeout: std::time::Duration::from_secs(5),
        };
        std::thread::spawn(move || {
            let open = || Updater::new(Store::open(&dir).unwrap(), policy.clone()).unwrap();
            let mut updater = open();
            let mut restarted = false;
            let mut replies = Vec::new();
            while let Ok(Some(m)) = link.recv(std::time::Duration::from_secs(5)) {
                let Some((reply, _)) = updater.handle(&m) else {
                    continue;
                };
                link.send(&reply).unwrap();
                replies.push(reply);
                if !restarted
                    && updater
                        .status()
                        .staged_model
                        .is_some_and(|s| s.received >= restart_at)
                {
                    restarted = true;
                    updater = open();
                }
            }
            replies
        })
    }

    /// Retries as the host's `flash` does, with waits to suit an in-memory link.
    const RETRY: Retry = Retry {
        retries: 50,
        timeout: std::time::Duration::from_millis(20),
    };

    #[test]
    fn an_upload_survives_a_noisy_link_and_a_device_restart() {
        let image: Vec<u8> = (0..300_000u32).map(|i| (i ^ (i >> 9)) as u8).collect();
        let tmp = tempfile::tempdir().unwrap();
        let noise = Noise {
            flip: 1e-5,
            drop: 1e-5,
        };
        let (mut host, link) = MemoryLink::pair(noise, 7);
        let device = device(link, tmp.path().to_owned(), image.len() as u64 / 2);
        let begin = Message::Begin(Begin {
            kind: ImageKind::Model,
            size: image.len() as u64,
            sha256: Sha256::digest(&image).into(),
            version: "2".into(),
            signature: Vec::new(),
        });
        let config = UploadConfig {
            baud: 100_000_000,
            initial_rtt: std::time::Duration::from_millis(1),
            retries: 20,
            ..UploadConfig::default()
        };
        let mut resumed_at = Vec::new();
        for session in 0.. {
            assert!(
                session < 4,
                "no progress after {session} sessions: {resumed_at:?}"
            );
            let offset = request(&mut host, &begin, RETRY, None, |_| {}).unwrap();
            resumed_at.push(offset);
            let mut uploader = Uploader::new(&image, offset, config);
            match drive(&mut host, &mut uploader, |_| {}) {
                Ok(_) => break,
                Err(DriveError::Upload(UploadError::Dropped { acked })) => {
                    assert!(acked >= offset, "went back from {offset} to {acked}");
                }
                Err(e) => panic!("{e}"),
            }
        }
        // The restart cut the first session; the second resumed where the device's file ended,
        // not at zero.
        assert_eq!(resumed_at.len(), 2, "{resumed_at:?}");
        assert!(resumed_at[1] >= image.len() as u64 / 2, "{resumed_at:?}");
        let staged = fs::read(tmp.path().join("staging/model.part")).unwrap();
        assert!(staged == image, "the staged bytes differ from the image");
        // Commit checks the hash first: refusing the bytes as a model means they hashed right.
        // (A resent Commit after a lost answer gets "no upload", so the device's own replies
        // say how the first one ended.)
        let stale = Some(image.len() as u64);
        let answer = request(&mut host, &Message::Commit, RETRY, stale, |_| {});
        assert!(
            matches!(answer, Err(RequestError::Refused(_))),
            "{answer:?}"
        );
        drop(host);
        let replies = device.join().unwrap();
        // The noise made the device refuse out-of-order chunks, and the restart made it refuse
        // chunks of the upload it had forgotten.
        let refused = |reason| {
            replies
                .iter()
                .filter(|m| matches!(m, Message::Nack(n) if n.reason == reason))
                .count()
        };
        assert!(refused(NackReason::BadOffset) > 0, "the noise cost nothing");
        assert!(refused(NackReason::NoUpload) > 0);
        assert_eq!(
            refused(NackReason::SelfTestFailed),
            1,
            "{:?}",
            replies.last()
        );
        assert_eq!(refused(NackReason::HashMismatch), 0);
    }

    #[test]
    fn a_crash_at_any_step_of_activation_leaves_the_old_or_the_new_model_whole() {
        let old = vec![1u8; 10_000];
        let new = vec![2u8; 12_345];
        let mut outcomes = Vec::new();
        for crash_at in 0.. {
            let tmp = tempfile::tempdir().unwrap();
            let store = Store::open(tmp.path()).unwrap();
            stage(&store, &old);
            store.activate(entry("1", &old), &mut |_| Ok(())).unwrap();
            stage(&store, &new);
            let mut step = 0;
            let result = store.activate(entry("2", &new), &mut |_| {
                step += 1;
                if step > crash_at {
                    Err(io::Error::other("power cut"))
                } else {
                    Ok(())
                }
            });
            // What a restart finds.
            let bytes = active_bytes(tmp.path());
            assert!(
                bytes == old || bytes == new,
                "crash at step {crash_at}: neither model"
            );
            outcomes.push(bytes == new);
            if result.is_ok() {
                assert_eq!(bytes, new);
                // The previous model is kept for rollback, and nothing else.
                let store = Store::open(tmp.path()).unwrap();
                let (prev, path) = store.previous().unwrap();
                assert_eq!(prev.version, "1");
                assert_eq!(fs::read(path).unwrap(), old);
                assert_eq!(fs::read_dir(tmp.path().join("models")).unwrap().count(), 2);
                break;
            }
        }
        // Every step was cut at least once, and the switch happens at exactly one of them.
        assert!(outcomes.len() >= 6, "{outcomes:?}");
        let switch = outcomes.iter().position(|&n| n).unwrap();
        assert!(outcomes[..switch].iter().all(|&n| !n) && outcomes[switch..].iter().all(|&n| n));
    }
}
