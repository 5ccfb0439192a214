//! The device's updater fed arbitrary message sequences, each from a fresh state folder.
//!
//! Every `Begin` is turned into a model upload: a firmware upload that committed would make the
//! updater execute the received bytes as its self-test.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use petcam_device::threads::Threads;
use petcam_device::update::{Policy, Store, Updater};
use petcam_shared::protocol::{ImageKind, Message};

fn policy() -> Policy {
    Policy {
        trusted_key: None,
        allow_downgrade: false,
        max_size: 1 << 16,
        latency_budget_ms: 1_000.0,
        threads: Threads::fixed(1),
        required_labels: None,
        firmware_version: "1".into(),
        firmware_self_test_timeout: Duration::from_secs(1),
    }
}

fuzz_target!(|data: &[u8]| {
    // tmpfs when there is one: the updater syncs what it writes.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary folder");
    let open = || Updater::new(Store::open(dir.path()).unwrap(), policy()).unwrap();
    let mut updater = open();
    let mut rest = data;
    while let Ok((mut msg, tail)) = postcard::take_from_bytes::<Message>(rest) {
        rest = tail;
        if let Message::Begin(b) = &mut msg {
            b.kind = ImageKind::Model;
        }
        // A `Hello`, which the updater does not handle, stands for a restart: a new updater on
        // the same folder, as after a power cut.
        if let Message::Hello(_) = msg {
            updater = open();
            continue;
        }
        if let Some((reply, _)) = updater.handle(&msg) {
            assert!(
                matches!(
                    reply,
                    Message::Ack { .. } | Message::Nack(_) | Message::Status(_)
                ),
                "{reply:?}"
            );
        }
        let status = updater.status();
        if let Some(s) = status.staged_model {
            assert!(
                s.received <= s.size,
                "received past the announced size: {s:?}"
            );
        }
    }
});
