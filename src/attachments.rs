//! Inbound attachments: stored content-addressed under `[attachments] dir` and served through
//! signed, expiring links (`GET /api/attachments/{id}?expires=…&name=…&type=…&sig=…`).
//!
//! The id is the SHA-256 of the bytes, so the same file received twice is stored once. The
//! signature is an HMAC-SHA256 over id, expiry, name and type with a key kept in
//! `<dir>/.link-key` (created on first use, mode 0600), so links survive restarts and a
//! changed or expired link is refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::hmac;

use crate::inbound::sha256_hex;

#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("cannot use the attachments folder {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the link is not valid (tampered with, or not issued by this service)")]
    BadSignature,
    #[error("the link expired")]
    Expired,
    #[error("no such attachment")]
    NotFound,
}

#[derive(Clone)]
pub struct AttachmentStore {
    dir: PathBuf,
    key: hmac::Key,
    base_url: String,
    ttl: Duration,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AttachmentError + '_ {
    move |source| AttachmentError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl AttachmentStore {
    /// Opens (creating) the folder and its link key.
    pub fn open(dir: &Path, base_url: &str, ttl: Duration) -> Result<Self, AttachmentError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_path = dir.join(".link-key");
        let key = match std::fs::read(&key_path) {
            Ok(k) if k.len() >= 32 => k,
            _ => {
                let mut k = [0u8; 32];
                aws_lc_rs::rand::fill(&mut k).map_err(|_| AttachmentError::Io {
                    path: key_path.display().to_string(),
                    source: std::io::Error::other("no randomness"),
                })?;
                let tmp = dir.join(format!(".link-key.{}", std::process::id()));
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(io_err(&tmp))?;
                    f.write_all(&k).map_err(io_err(&tmp))?;
                }
                // Two instances racing: the first rename wins, both then read the same key.
                if !key_path.exists() {
                    std::fs::rename(&tmp, &key_path).map_err(io_err(&key_path))?;
                } else {
                    let _ = std::fs::remove_file(&tmp);
                }
                std::fs::read(&key_path).map_err(io_err(&key_path))?
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            base_url: base_url.trim_end_matches('/').to_string(),
            ttl,
        })
    }

    fn path_of(&self, id: &str) -> Option<PathBuf> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(self.dir.join(&id[..2]).join(id))
    }

    /// Stores the bytes (once per content) and returns their id.
    pub fn store(&self, bytes: &[u8]) -> Result<String, AttachmentError> {
        let id = sha256_hex(bytes);
        let path = self.path_of(&id).ok_or(AttachmentError::NotFound)?;
        if path.exists() {
            return Ok(id);
        }
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        let tmp = parent.join(format!(".{id}.{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(id)
    }

    fn signature(&self, id: &str, expires: i64, name: &str, mime: &str) -> String {
        let tag = hmac::sign(
            &self.key,
            format!("{id}\n{expires}\n{name}\n{mime}").as_bytes(),
        );
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A link valid for the configured `link_ttl` from `now` (Unix seconds).
    pub fn link(&self, id: &str, name: &str, mime: &str, now: i64) -> String {
        let expires = now + self.ttl.as_secs() as i64;
        let sig = self.signature(id, expires, name, mime);
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        format!(
            "{}/api/attachments/{id}?expires={expires}&name={}&type={}&sig={sig}",
            self.base_url,
            enc(name),
            enc(mime)
        )
    }

    /// The file behind a link, when the link is genuine and not expired.
    pub fn open_link(
        &self,
        id: &str,
        expires: i64,
        name: &str,
        mime: &str,
        sig: &str,
        now: i64,
    ) -> Result<PathBuf, AttachmentError> {
        let expected = self.signature(id, expires, name, mime);
        let given = sig.as_bytes();
        if given.len() != expected.len()
            || given
                .iter()
                .zip(expected.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0
        {
            return Err(AttachmentError::BadSignature);
        }
        if now > expires {
            return Err(AttachmentError::Expired);
        }
        let path = self.path_of(id).ok_or(AttachmentError::NotFound)?;
        if !path.is_file() {
            return Err(AttachmentError::NotFound);
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_verify_and_refuse_tampering_and_expiry() {
        let dir = std::env::temp_dir().join(format!("mb-att-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = AttachmentStore::open(&dir, "http://h:1/", Duration::from_secs(60)).unwrap();
        let id = store.store(b"hello").unwrap();
        assert_eq!(store.store(b"hello").unwrap(), id);
        let link = store.link(&id, "a b.txt", "text/plain", 1000);
        assert!(link.starts_with(&format!(
            "http://h:1/api/attachments/{id}?expires=1060&name=a+b.txt"
        )));
        let sig = link.rsplit("sig=").next().unwrap();
        let path = store
            .open_link(&id, 1060, "a b.txt", "text/plain", sig, 1001)
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"hello");
        assert!(matches!(
            store.open_link(&id, 1061, "a b.txt", "text/plain", sig, 1001),
            Err(AttachmentError::BadSignature)
        ));
        assert!(matches!(
            store.open_link(&id, 1060, "a b.txt", "text/html", sig, 1001),
            Err(AttachmentError::BadSignature)
        ));
        assert!(matches!(
            store.open_link(&id, 1060, "a b.txt", "text/plain", sig, 2000),
            Err(AttachmentError::Expired)
        ));
        // The key persists: a reopened store accepts the same link.
        let again = AttachmentStore::open(&dir, "http://h:1", Duration::from_secs(60)).unwrap();
        assert!(again
            .open_link(&id, 1060, "a b.txt", "text/plain", sig, 1001)
            .is_ok());
    }
}
