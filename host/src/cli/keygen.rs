//! `petcam keygen`: an ed25519 key pair for signing uploads.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use ed25519_dalek::SigningKey;
use petcam_shared::signing;

/// Write an ed25519 key pair: NAME.key (secret, for `petcam flash --key`) and NAME.pub (for
/// `petcam-device --trusted-key`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path and name of the pair, without extension.
    #[arg(long, value_name = "NAME")]
    pub out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let secret_path = args.out.with_extension("key");
    let public_path = args.out.with_extension("pub");
    for p in [&secret_path, &public_path] {
        if p.exists() && !args.force {
            anyhow::bail!(
                "{} exists; keep it (a device that trusts it would refuse uploads signed with a new key) or pass --force",
                p.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    write_secret(
        &secret_path,
        &signing::encode_key(signing::SECRET_KEY_TAG, &seed),
    )?;
    std::fs::write(
        &public_path,
        signing::encode_key(signing::PUBLIC_KEY_TAG, key.verifying_key().as_bytes()),
    )
    .with_context(|| format!("cannot write {}", public_path.display()))?;
    println!(
        "secret key {} (keep it private: it signs uploads)\npublic key {} (give it to the device: petcam-device ... --trusted-key {})",
        secret_path.display(),
        public_path.display(),
        public_path.display()
    );
    Ok(())
}

fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a secret key written by [`run`].
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the key {}", path.display()))?;
    let seed = signing::decode_key(signing::SECRET_KEY_TAG, &text).with_context(|| {
        format!(
            "{} is not a petcam secret key (`petcam keygen --out NAME` writes NAME.key; NAME.pub is for the device)",
            path.display()
        )
    })?;
    Ok(SigningKey::from_bytes(&seed))
}
