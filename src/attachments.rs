//! Inbound attachments, and the raw bytes of dead-lettered inbound emails: stored
//! content-addressed under `[attachments] dir` and served through signed, expiring links
//! (`GET /api/attachments/{id}?expires=…&name=…&type=…&sig=…`).
//!
//! The id is the SHA-256 of the bytes, so the same file received twice is stored once. Bytes
//! that arrive in pieces (an email too large to hold in memory) go through a [`RawWriter`],
//! which hashes as it writes and names the file by that hash when it is finished. The
//! signature is an HMAC-SHA256 over id, expiry, name and type with a key kept in
//! `<dir>/.link-key` (created on first use, mode 0600), so links survive restarts and a
//! changed or expired link is refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::{digest, hmac};

use crate::inbound::sha256_hex;
use crate::settings::Secret;

/// The shortest link key accepted: HMAC-SHA256 wants a key as long as its output.
const MIN_KEY_BYTES: usize = 32;

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
    #[error("the link key {path} is only {len} bytes; at least {MIN_KEY_BYTES} are needed. Delete the file to have a new random key made at start (links issued so far then stop working), or replace it with at least {MIN_KEY_BYTES} random bytes")]
    ShortKey { path: String, len: usize },
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
    /// Opens (creating) the folder and its link key. An existing key shorter than 32 bytes is
    /// refused rather than used: links signed with it would be forgeable.
    pub fn open(dir: &Path, base_url: &str, ttl: Duration) -> Result<Self, AttachmentError> {
        Self::open_with_key(dir, base_url, ttl, None)
    }

    /// The store `[attachments]` describes (its folder, links, and `link_key` when given).
    pub fn for_settings(a: &crate::settings::AttachmentsSection) -> Result<Self, AttachmentError> {
        Self::open_with_key(
            &a.dir,
            &a.public_base_url,
            a.link_ttl.0,
            a.link_key.as_ref(),
        )
    }

    /// Like [`AttachmentStore::open`], signing with `key` (`[attachments] link_key`, at least
    /// 32 bytes, the same on every instance) when given instead of the key file.
    pub fn open_with_key(
        dir: &Path,
        base_url: &str,
        ttl: Duration,
        key: Option<&Secret>,
    ) -> Result<Self, AttachmentError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        if let Some(key) = key {
            return Ok(Self {
                dir: dir.to_path_buf(),
                key: hmac::Key::new(hmac::HMAC_SHA256, key.expose().as_bytes()),
                base_url: base_url.trim_end_matches('/').to_string(),
                ttl,
            });
        }
        let key_path = dir.join(".link-key");
        let key = match std::fs::read(&key_path) {
            Ok(k) if k.len() >= MIN_KEY_BYTES => k,
            Ok(k) => {
                return Err(AttachmentError::ShortKey {
                    path: key_path.display().to_string(),
                    len: k.len(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_key(dir, &key_path)?,
            Err(e) => return Err(io_err(&key_path)(e)),
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

    /// A writer for bytes that arrive in pieces; [`RawWriter::finish`] stores them under their
    /// hash, durably (synced to disk before it returns).
    pub fn writer(&self) -> Result<RawWriter, AttachmentError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".incoming.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(RawWriter {
            store_dir: self.dir.clone(),
            tmp,
            file: Some(file),
            hash: digest::Context::new(&digest::SHA256),
            size: 0,
        })
    }

    /// Stores `bytes` durably (see [`AttachmentStore::writer`]) and returns their id.
    pub fn store_durably(&self, bytes: &[u8]) -> Result<StoredRaw, AttachmentError> {
        let mut w = self.writer()?;
        w.write(bytes)?;
        w.finish()
    }

    /// The stored bytes of `id`.
    pub fn read(&self, id: &str) -> Result<Vec<u8>, AttachmentError> {
        let path = self.path_of(id).ok_or(AttachmentError::NotFound)?;
        match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AttachmentError::NotFound),
            Err(e) => Err(io_err(&path)(e)),
        }
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

/// Makes the link key: random bytes, written to a private temporary file and renamed into
/// place, so two instances starting at once end up reading the same key.
fn new_key(dir: &Path, key_path: &Path) -> Result<Vec<u8>, AttachmentError> {
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
        std::fs::rename(&tmp, key_path).map_err(io_err(key_path))?;
    } else {
        let _ = std::fs::remove_file(&tmp);
    }
    std::fs::read(key_path).map_err(io_err(key_path))
}

/// What a [`RawWriter`] stored: the id (SHA-256 of the bytes) and how many bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRaw {
    pub id: String,
    pub size: u64,
}

/// Bytes being stored piece by piece; hashed as they are written. Dropped unfinished, it
/// removes its temporary file.
pub struct RawWriter {
    store_dir: PathBuf,
    tmp: PathBuf,
    file: Option<std::fs::File>,
    hash: digest::Context,
    size: u64,
}

impl RawWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), AttachmentError> {
        let Some(file) = self.file.as_mut() else {
            return Err(io_err(&self.tmp)(std::io::Error::other("already finished")));
        };
        file.write_all(bytes).map_err(io_err(&self.tmp))?;
        self.hash.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the file, moves it to its content address (or drops it when those bytes are
    /// already stored) and syncs the folder: once this returns, the bytes survive a crash.
    pub fn finish(mut self) -> Result<StoredRaw, AttachmentError> {
        let Some(file) = self.file.take() else {
            return Err(io_err(&self.tmp)(std::io::Error::other("already finished")));
        };
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        let id: String = self
            .hash
            .clone()
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let parent = self.store_dir.join(id.get(..2).unwrap_or("00"));
        let path = parent.join(&id);
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        if path.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        } else {
            std::fs::rename(&self.tmp, &path).map_err(io_err(&path))?;
            if let Ok(dir) = std::fs::File::open(&parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(StoredRaw {
            id,
            size: self.size,
        })
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
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

    #[test]
    fn a_configured_link_key_signs_alike_on_every_instance() {
        let base = std::env::temp_dir().join(format!("mb-att-shared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let key = Secret::new("k".repeat(40));
        let ttl = Duration::from_secs(60);
        let a =
            AttachmentStore::open_with_key(&base.join("a"), "http://h:1", ttl, Some(&key)).unwrap();
        let b =
            AttachmentStore::open_with_key(&base.join("b"), "http://h:2", ttl, Some(&key)).unwrap();
        let own = AttachmentStore::open(&base.join("c"), "http://h:3", ttl).unwrap();
        let id = a.store(b"shared bytes").unwrap();
        let link = a.link(&id, "f.txt", "text/plain", 1000);
        let sig = link.rsplit("sig=").next().unwrap();
        // Another instance with the same key accepts the link (it lacks only the bytes)…
        assert!(matches!(
            b.open_link(&id, 1060, "f.txt", "text/plain", sig, 1001),
            Err(AttachmentError::NotFound)
        ));
        b.store(b"shared bytes").unwrap();
        assert!(b
            .open_link(&id, 1060, "f.txt", "text/plain", sig, 1001)
            .is_ok());
        // …one with a key of its own does not; no key file is made when one is configured.
        assert!(matches!(
            own.open_link(&id, 1060, "f.txt", "text/plain", sig, 1001),
            Err(AttachmentError::BadSignature)
        ));
        assert!(!base.join("a").join(".link-key").exists());
        assert!(base.join("c").join(".link-key").exists());
    }

    #[test]
    fn a_short_link_key_is_refused_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("mb-att-short-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".link-key"), b"only sixteen b..").unwrap();
        let err = AttachmentStore::open(&dir, "http://h:1", Duration::from_secs(60))
            .err()
            .expect("a 16-byte key is refused");
        assert!(
            matches!(err, AttachmentError::ShortKey { len: 16, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(".link-key") && text.contains("Delete the file"),
            "{text}"
        );
        // Deleting it, as the message says, gives a fresh key of full length.
        std::fs::remove_file(dir.join(".link-key")).unwrap();
        AttachmentStore::open(&dir, "http://h:1", Duration::from_secs(60)).unwrap();
        assert_eq!(std::fs::read(dir.join(".link-key")).unwrap().len(), 32);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pieces_are_stored_under_the_hash_of_the_whole() {
        let dir = std::env::temp_dir().join(format!("mb-att-raw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = AttachmentStore::open(&dir, "http://h:1", Duration::from_secs(60)).unwrap();
        let whole: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut w = store.writer().unwrap();
        for piece in whole.chunks(65_536) {
            w.write(piece).unwrap();
        }
        let stored = w.finish().unwrap();
        assert_eq!(stored.id, sha256_hex(&whole));
        assert_eq!(stored.size, whole.len() as u64);
        assert_eq!(store.read(&stored.id).unwrap(), whole);
        assert_eq!(store.store(&whole).unwrap(), stored.id);
        assert_eq!(store.store_durably(&whole).unwrap(), stored);
        // An unfinished writer leaves nothing behind.
        let mut w = store.writer().unwrap();
        w.write(b"half").unwrap();
        drop(w);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".incoming"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(matches!(
            store.read(&"0".repeat(64)),
            Err(AttachmentError::NotFound)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
