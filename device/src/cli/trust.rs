//! Which uploads a device accepts: the trust options `agent` and `run` share, and the
//! policies built from them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use petcam_device::threads::Threads;
use petcam_device::update::Policy;
use petcam_shared::signing::{self, VerifyingKey};

/// Which uploads are accepted.
#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// Public key (`NAME.pub` from `petcam keygen`) that uploads must be signed with.
    #[arg(long, value_name = "FILE", required_unless_present = "allow_unsigned")]
    pub trusted_key: Option<PathBuf>,
    /// Accept unsigned uploads. For a bench device only: anyone on the link can replace the model.
    #[arg(long, conflicts_with = "trusted_key")]
    pub allow_unsigned: bool,
    /// Accept a model older than the active one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Largest upload accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_upload_mib: u64,
    /// A model whose golden inference takes longer than this fails its self-test.
    #[arg(long, default_value_t = 2000.0)]
    pub latency_budget_ms: f64,
}

impl TrustArgs {
    pub fn policy(&self, threads: Threads) -> anyhow::Result<Policy> {
        let mut p = policy(
            self.trusted_key.as_deref(),
            self.allow_downgrade,
            threads,
            None,
        )?;
        p.max_size = self.max_upload_mib << 20;
        p.latency_budget_ms = self.latency_budget_ms;
        Ok(p)
    }
}

/// What uploads are accepted: signed with `trusted_key`, or anything (a loud warning) when
/// there is none.
pub fn policy(
    trusted_key: Option<&Path>,
    allow_downgrade: bool,
    threads: Threads,
    required_labels: Option<Vec<String>>,
) -> anyhow::Result<Policy> {
    let trusted_key = match trusted_key {
        Some(path) => Some(read_public_key(path)?),
        None => {
            tracing::warn!(
                "--allow-unsigned: this device accepts UNSIGNED uploads; anyone on the serial link can replace its model"
            );
            None
        }
    };
    Ok(Policy {
        trusted_key,
        allow_downgrade,
        required_labels,
        ..local_policy(threads)
    })
}

/// The policy of a check that takes nothing from a link (`self-test`): no key to trust, and
/// so nothing to warn about.
pub fn local_policy(threads: Threads) -> Policy {
    Policy {
        trusted_key: None,
        allow_downgrade: false,
        max_size: 64 << 20,
        latency_budget_ms: 2000.0,
        threads,
        required_labels: None,
        firmware_version: env!("CARGO_PKG_VERSION").to_owned(),
        firmware_self_test_timeout: Duration::from_secs(60),
    }
}

fn read_public_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the trusted key {}", path.display()))?;
    let bytes = signing::decode_key(signing::PUBLIC_KEY_TAG, &text).with_context(|| {
        format!(
            "{} is not a petcam public key (expected `{} <64 hex digits>`, as `petcam keygen` writes NAME.pub)",
            path.display(),
            signing::PUBLIC_KEY_TAG
        )
    })?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid ed25519 public key ({e})", path.display()))
}
