//! WireGuard key pairs for the lab's nodes, made with `wg genkey` and `wg pubkey`.
//!
//! The private key never passes through a world-readable file: `wg genkey` writes to a pipe and
//! the key file is created with mode 0600. Depends on `sys` (commands), `state` (file writing)
//! and the model's key type.

use std::ffi::OsStr;
use std::path::Path;

use super::LabError;
use super::state::write_private;
use super::sys::{run, run_with};
use crate::model::WgKey;

/// Generate a key pair, write the private key to `path` (mode 0600) and return the public key.
pub fn generate(path: &Path) -> Result<WgKey, LabError> {
    let private = run("wg", &["genkey"])?;
    let private = private.trim();
    write_private(path, format!("{private}\n").as_bytes())?;
    let public = run_with(
        "wg",
        &[OsStr::new("pubkey")],
        Some(format!("{private}\n").as_bytes()),
        &[],
    )?;
    public.trim().parse().map_err(|e| LabError::Command {
        command: "wg pubkey".to_owned(),
        status: "exit status: 0".to_owned(),
        stderr: format!("printed {:?}, not a key: {e}", public.trim()),
    })
}
