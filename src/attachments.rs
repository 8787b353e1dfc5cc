//! Inbound attachments, and the raw bytes of dead-lettered inbound emails: stored
//! content-addressed and served through signed, expiring links
//! (`GET /api/attachments/{id}?expires=…&name=…&type=…&sig=…`).
//!
//! The id is the SHA-256 of the bytes, so the same file received twice is stored once. Where
//! the bytes live is `[attachments] store`: in PostgreSQL (the default; tables
//! `attachment_parts` and `attachment_blobs`, parts of at most [`PART`] bytes, the blob row
//! written last in the same transaction), so that every instance serves every link; or as
//! files under `[attachments] dir` (`<dir>/<id[..2]>/<id>`), a shared folder when several
//! instances run. Bytes that arrive in pieces (an email too large to hold in memory) go
//! through a [`RawWriter`], which spools them to `dir`, hashes as it writes and stores them
//! by that hash when it is finished.
//!
//! The signature is an HMAC-SHA256 over id, expiry, name and type with `[attachments]
//! link_key`, or else a key kept in `<dir>/.link-key` (created on first use, mode 0600), so
//! links survive restarts and a changed or expired link is refused.
//!
//! Storing and reading are blocking (the parser's callers run on tokio's blocking pool); with
//! PostgreSQL they run their queries on the runtime the store was opened on. Serving a link
//! ([`AttachmentStore::serve`]) is async and streams the bytes part by part.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use deadpool_postgres::Pool;
use futures_util::stream::{self, BoxStream, StreamExt};

use crate::inbound::sha256_hex;
use crate::settings::{AttachmentBackend, Secret};
use crate::storage::StorageError;

/// The shortest link key accepted: HMAC-SHA256 wants a key as long as its output.
const MIN_KEY_BYTES: usize = 32;

/// The largest part stored in one `attachment_parts` row, and served in one piece.
pub const PART: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    #[error("cannot use the attachments folder {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the attachment store in PostgreSQL failed: {0}")]
    Database(#[from] StorageError),
    #[error("the link is not valid (tampered with, or not issued by this service)")]
    BadSignature,
    #[error("the link expired")]
    Expired,
    #[error("no such attachment")]
    NotFound,
    #[error("the range asked for lies outside the attachment's {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("the link key {path} is only {len} bytes; at least {MIN_KEY_BYTES} are needed. Delete the file to have a new random key made at start (links issued so far then stop working), or replace it with at least {MIN_KEY_BYTES} random bytes")]
    ShortKey { path: String, len: usize },
}

impl From<tokio_postgres::Error> for AttachmentError {
    fn from(e: tokio_postgres::Error) -> Self {
        AttachmentError::Database(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for AttachmentError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        AttachmentError::Database(e.into())
    }
}

/// Where the bytes live.
#[derive(Clone)]
enum Backend {
    Dir,
    /// PostgreSQL, queried on `rt` (the runtime the store was opened on) by the blocking calls.
    Postgres {
        pool: Pool,
        rt: tokio::runtime::Handle,
    },
}

#[derive(Clone)]
pub struct AttachmentStore {
    dir: PathBuf,
    backend: Backend,
    key: hmac::Key,
    base_url: String,
    ttl: Duration,
}

/// Bytes to store together ([`AttachmentStore::stage`], then [`AttachmentStore::commit`]):
/// a batch's attachments in one write instead of one each.
#[derive(Default)]
pub struct Staged {
    blobs: Vec<(String, Vec<u8>)>,
}

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }
}

/// Stored bytes being served: their whole size, the range served and its bytes, part by part.
pub struct Opened {
    pub size: u64,
    /// The bytes served, `start..end` of the whole; `0..size` without a range.
    pub served: std::ops::Range<u64>,
    pub body: BoxStream<'static, Result<Vec<u8>, AttachmentError>>,
}

/// One byte range as an HTTP `Range: bytes=…` header asks for it (RFC 9110 §14.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `first-` or `first-last` (`last` inclusive).
    From { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a `Range` header value; `None` for anything but one well-formed byte range
    /// (several ranges, other units, bad syntax), which is then ignored and the whole sent.
    pub fn parse(header: &str) -> Option<ByteRange> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        if first.is_empty() {
            return last.parse().ok().map(ByteRange::Suffix);
        }
        let first: u64 = first.parse().ok()?;
        let last = if last.is_empty() {
            None
        } else {
            let last: u64 = last.parse().ok()?;
            if last < first {
                return None;
            }
            Some(last)
        };
        Some(ByteRange::From { first, last })
    }

    /// The bytes `start..end` of `size` it selects, or `RangeNotSatisfiable`.
    pub fn within(self, size: u64) -> Result<std::ops::Range<u64>, AttachmentError> {
        let refused = AttachmentError::RangeNotSatisfiable { size };
        match self {
            ByteRange::From { first, .. } if first >= size => Err(refused),
            ByteRange::From { first, last } => {
                Ok(first..last.map_or(size, |l| l.saturating_add(1).min(size)))
            }
            ByteRange::Suffix(0) => Err(refused),
            ByteRange::Suffix(n) => Ok(size.saturating_sub(n)..size),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AttachmentError + '_ {
    move |source| AttachmentError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl AttachmentStore {
    /// Opens (creating) the folder and its link key, storing files in the folder. An existing
    /// key shorter than 32 bytes is refused rather than used: links signed with it would be
    /// forgeable.
    pub fn open(dir: &Path, base_url: &str, ttl: Duration) -> Result<Self, AttachmentError> {
        Self::open_with_key(dir, base_url, ttl, None)
    }

    /// The store `[attachments]` describes (its backend, folder, links, and `link_key` when
    /// given). With `store = "postgres"` it must be called on the runtime that then serves its
    /// queries.
    pub fn for_settings(
        a: &crate::settings::AttachmentsSection,
        pool: &Pool,
    ) -> Result<Self, AttachmentError> {
        let store = Self::open_with_key(
            &a.dir,
            &a.public_base_url,
            a.link_ttl.0,
            a.link_key.as_ref(),
        )?;
        match a.store {
            AttachmentBackend::Dir => Ok(store),
            AttachmentBackend::Postgres => store.in_postgres(pool),
        }
    }

    /// This store, keeping its bytes in PostgreSQL instead of the folder.
    pub fn in_postgres(mut self, pool: &Pool) -> Result<Self, AttachmentError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|e| AttachmentError::Io {
            path: self.dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.backend = Backend::Postgres {
            pool: pool.clone(),
            rt,
        };
        Ok(self)
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
        let key = match key {
            Some(key) => key.expose().as_bytes().to_vec(),
            None => file_key(dir)?,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            backend: Backend::Dir,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            base_url: base_url.trim_end_matches('/').to_string(),
            ttl,
        })
    }

    fn path_of(&self, id: &str) -> Option<PathBuf> {
        valid_id(id).then(|| self.dir.join(&id[..2]).join(id))
    }

    /// Runs a query of the PostgreSQL backend from blocking code.
    fn blocking_pg<T>(
        rt: &tokio::runtime::Handle,
        query: impl std::future::Future<Output = Result<T, AttachmentError>>,
    ) -> Result<T, AttachmentError> {
        rt.block_on(query)
    }

    /// Stores the bytes (once per content) and returns their id. Blocking.
    pub fn store(&self, bytes: &[u8]) -> Result<String, AttachmentError> {
        let id = sha256_hex(bytes);
        match &self.backend {
            Backend::Postgres { pool, rt } => {
                Self::blocking_pg(
                    rt,
                    put_parts(pool, &id, bytes.len() as u64, parts_of(bytes)),
                )?;
            }
            Backend::Dir => {
                let path = self.path_of(&id).ok_or(AttachmentError::NotFound)?;
                if path.exists() {
                    return Ok(id);
                }
                let parent = path.parent().unwrap_or(&self.dir);
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
                let tmp = parent.join(format!(".{id}.{}", std::process::id()));
                std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
            }
        }
        Ok(id)
    }

    /// The id `bytes` will have once `staged` is committed (links to it may be made now, and
    /// published once the commit returned).
    pub fn stage(&self, staged: &mut Staged, bytes: Vec<u8>) -> String {
        let id = sha256_hex(&bytes);
        if !staged.blobs.iter().any(|(known, _)| *known == id) {
            staged.blobs.push((id.clone(), bytes));
        }
        id
    }

    /// Stores everything staged: in PostgreSQL the blobs of one part in one statement, larger
    /// ones each in its transaction; in the folder each as [`AttachmentStore::store`] does.
    /// Blocking.
    pub fn commit(&self, staged: Staged) -> Result<(), AttachmentError> {
        match &self.backend {
            Backend::Postgres { pool, rt } => Self::blocking_pg(rt, async {
                let (small, large): (Vec<_>, Vec<_>) = staged
                    .blobs
                    .iter()
                    .partition(|(_, bytes)| bytes.len() <= PART);
                if !small.is_empty() {
                    let ids: Vec<&str> = small.iter().map(|(id, _)| id.as_str()).collect();
                    let bytes: Vec<&[u8]> = small.iter().map(|(_, b)| b.as_slice()).collect();
                    let c = pool.get().await?;
                    let insert = c
                        .prepare_cached(
                            "WITH b AS (SELECT * FROM unnest($1::text[], $2::bytea[]) AS b(id, bytes)),
                             p AS (INSERT INTO attachment_parts (id, part, bytes)
                                   SELECT id, 0, bytes FROM b ON CONFLICT DO NOTHING)
                             INSERT INTO attachment_blobs (id, size, parts)
                             SELECT id, length(bytes), 1 FROM b ON CONFLICT DO NOTHING",
                        )
                        .await?;
                    c.execute(&insert, &[&ids, &bytes]).await?;
                }
                for (id, bytes) in large {
                    put_parts(pool, id, bytes.len() as u64, parts_of(bytes)).await?;
                }
                Ok(())
            }),
            Backend::Dir => {
                for (_, bytes) in &staged.blobs {
                    self.store(bytes)?;
                }
                Ok(())
            }
        }
    }

    /// A writer for bytes that arrive in pieces; [`RawWriter::finish`] stores them under their
    /// hash, durably (committed, or synced to disk, before it returns).
    pub fn writer(&self) -> Result<RawWriter, AttachmentError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".incoming.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(RawWriter {
            store_dir: self.dir.clone(),
            backend: self.backend.clone(),
            tmp,
            file: Some(file),
            hash: digest::Context::new(&digest::SHA256),
            size: 0,
        })
    }

    /// Stores `bytes` durably (see [`AttachmentStore::writer`]) and returns their id.
    /// Blocking.
    pub fn store_durably(&self, bytes: &[u8]) -> Result<StoredRaw, AttachmentError> {
        if let Backend::Postgres { .. } = self.backend {
            // A commit is durable already.
            let id = self.store(bytes)?;
            return Ok(StoredRaw {
                id,
                size: bytes.len() as u64,
            });
        }
        let mut w = self.writer()?;
        w.write(bytes)?;
        w.finish()
    }

    /// The stored bytes of `id`. Blocking.
    pub fn read(&self, id: &str) -> Result<Vec<u8>, AttachmentError> {
        if !valid_id(id) {
            return Err(AttachmentError::NotFound);
        }
        match &self.backend {
            Backend::Postgres { pool, rt } => Self::blocking_pg(rt, async {
                let c = pool.get().await?;
                if c.query_opt("SELECT 1 FROM attachment_blobs WHERE id = $1", &[&id])
                    .await?
                    .is_none()
                {
                    return Err(AttachmentError::NotFound);
                }
                let rows = c
                    .query(
                        "SELECT bytes FROM attachment_parts WHERE id = $1 ORDER BY part",
                        &[&id],
                    )
                    .await?;
                let mut out = Vec::new();
                for r in rows {
                    out.extend_from_slice(r.try_get::<_, &[u8]>(0)?);
                }
                Ok(out)
            }),
            Backend::Dir => {
                let path = self.path_of(id).ok_or(AttachmentError::NotFound)?;
                match std::fs::read(&path) {
                    Ok(b) => Ok(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(AttachmentError::NotFound)
                    }
                    Err(e) => Err(io_err(&path)(e)),
                }
            }
        }
    }

    fn signature(&self, id: &str, expires: i64, name: &str, mime: &str) -> String {
        let tag = hmac::sign(
            &self.key,
            format!("{id}\n{expires}\n{name}\n{mime}").as_bytes(),
        );
        hex(tag.as_ref())
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

    /// Checks a link: genuine (its signature), not expired, naming a possible id.
    pub fn check_link(
        &self,
        id: &str,
        expires: i64,
        name: &str,
        mime: &str,
        sig: &str,
        now: i64,
    ) -> Result<(), AttachmentError> {
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
        if !valid_id(id) {
            return Err(AttachmentError::NotFound);
        }
        Ok(())
    }

    /// The stored bytes of `id`, to serve (all, or the `range` of them): their size, then the
    /// bytes part by part (a connection is taken from the pool per part, never held while the
    /// client reads).
    pub async fn serve(
        &self,
        id: &str,
        range: Option<ByteRange>,
    ) -> Result<Opened, AttachmentError> {
        if !valid_id(id) {
            return Err(AttachmentError::NotFound);
        }
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                let row = pool
                    .get()
                    .await?
                    .query_opt(
                        "SELECT size, parts FROM attachment_blobs WHERE id = $1",
                        &[&id],
                    )
                    .await?
                    .ok_or(AttachmentError::NotFound)?;
                let size = u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0);
                let served = match range {
                    Some(r) => r.within(size)?,
                    None => 0..size,
                };
                // The parts holding `served`, each cut to the bytes of it that it holds.
                let part_len = PART as u64;
                let slices: Vec<(i32, i32, i32)> = (served.start / part_len
                    ..served.end.div_ceil(part_len))
                    .filter_map(|p| {
                        let base = p * part_len;
                        let lo = served.start.max(base) - base;
                        let hi = served.end.min(base + part_len) - base;
                        Some((
                            i32::try_from(p).ok()?,
                            i32::try_from(lo + 1).ok()?,
                            i32::try_from(hi - lo).ok()?,
                        ))
                    })
                    .collect();
                let (pool, id) = (pool.clone(), id.to_string());
                let body = stream::iter(slices)
                    .then(move |(part, from, len)| {
                        let (pool, id) = (pool.clone(), id.clone());
                        async move {
                            let row = pool
                                .get()
                                .await?
                                .query_one(
                                    "SELECT substring(bytes FROM $3 FOR $4) FROM attachment_parts \
                                     WHERE id = $1 AND part = $2",
                                    &[&id, &part, &from, &len],
                                )
                                .await?;
                            Ok(row.try_get::<_, Vec<u8>>(0)?)
                        }
                    })
                    .boxed();
                Ok(Opened { size, served, body })
            }
            Backend::Dir => {
                let path = self.path_of(id).ok_or(AttachmentError::NotFound)?;
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(AttachmentError::NotFound)
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                };
                let size = file.metadata().await.map_err(io_err(&path))?.len();
                let served = match range {
                    Some(r) => r.within(size)?,
                    None => 0..size,
                };
                let mut file = file;
                {
                    use tokio::io::AsyncSeekExt;
                    file.seek(std::io::SeekFrom::Start(served.start))
                        .await
                        .map_err(io_err(&path))?;
                }
                let left = served.end - served.start;
                let body =
                    stream::try_unfold((file, path, left), |(mut file, path, left)| async move {
                        use tokio::io::AsyncReadExt;
                        if left == 0 {
                            return Ok(None);
                        }
                        let want = usize::try_from(left.min(64 * 1024)).unwrap_or(64 * 1024);
                        let mut buf = vec![0u8; want];
                        let n = file.read(&mut buf).await.map_err(io_err(&path))?;
                        if n == 0 {
                            return Ok(None);
                        }
                        buf.truncate(n);
                        Ok(Some((buf, (file, path, left - n as u64))))
                    })
                    .boxed();
                Ok(Opened { size, served, body })
            }
        }
    }
}

/// `bytes` in parts of at most [`PART`] (one empty part for no bytes).
fn parts_of(bytes: &[u8]) -> impl Iterator<Item = Result<&[u8], AttachmentError>> {
    parts_or_empty(bytes.chunks(PART).map(Ok))
}

/// Stores the parts of `id` (`size` bytes) and then its blob row, in one transaction; nothing
/// when the blob is stored already. Two instances storing the same bytes at once both succeed
/// (the second's inserts wait for the first's and then do nothing).
async fn put_parts<P: AsRef<[u8]>>(
    pool: &Pool,
    id: &str,
    size: u64,
    parts: impl Iterator<Item = Result<P, AttachmentError>>,
) -> Result<(), AttachmentError> {
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let mut c = pool.get().await?;
    if size as usize <= PART {
        // One part: one statement.
        let mut parts = parts;
        let bytes = parts.next().transpose()?;
        let bytes: &[u8] = bytes.as_ref().map(|b| b.as_ref()).unwrap_or(&[]);
        let insert = c
            .prepare_cached(
                "WITH p AS (INSERT INTO attachment_parts (id, part, bytes) VALUES ($1, 0, $2) \
                 ON CONFLICT DO NOTHING) \
                 INSERT INTO attachment_blobs (id, size, parts) VALUES ($1, $3, 1) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        c.execute(&insert, &[&id, &bytes, &size]).await?;
        return Ok(());
    }
    let tx = c.transaction().await?;
    if tx
        .query_opt("SELECT 1 FROM attachment_blobs WHERE id = $1", &[&id])
        .await?
        .is_some()
    {
        return Ok(());
    }
    let mut n: i32 = 0;
    for part in parts {
        let part = part?;
        tx.execute(
            "INSERT INTO attachment_parts (id, part, bytes) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[&id, &n, &part.as_ref()],
        )
        .await?;
        n += 1;
    }
    tx.execute(
        "INSERT INTO attachment_blobs (id, size, parts) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
        &[&id, &size, &n],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The link key kept in `dir/.link-key`, made at first use.
fn file_key(dir: &Path) -> Result<Vec<u8>, AttachmentError> {
    let key_path = dir.join(".link-key");
    match std::fs::read(&key_path) {
        Ok(k) if k.len() >= MIN_KEY_BYTES => Ok(k),
        Ok(k) => Err(AttachmentError::ShortKey {
            path: key_path.display().to_string(),
            len: k.len(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_key(dir, &key_path),
        Err(e) => Err(io_err(&key_path)(e)),
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

/// Bytes being stored piece by piece: spooled to a file in `dir`, hashed as they are
/// written. Dropped unfinished, it removes its spool file.
pub struct RawWriter {
    store_dir: PathBuf,
    backend: Backend,
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

    /// Stores the spooled bytes under their hash (nothing when those bytes are stored
    /// already): committed to PostgreSQL part by part in one transaction, or synced, moved to
    /// their content address and the folder synced. Once this returns, the bytes survive a
    /// crash. Blocking.
    pub fn finish(mut self) -> Result<StoredRaw, AttachmentError> {
        let Some(mut file) = self.file.take() else {
            return Err(io_err(&self.tmp)(std::io::Error::other("already finished")));
        };
        let id = hex(self.hash.clone().finish().as_ref());
        let stored = StoredRaw {
            id,
            size: self.size,
        };
        if let Backend::Postgres { pool, rt } = &self.backend {
            file.rewind().map_err(io_err(&self.tmp))?;
            let tmp = self.tmp.clone();
            let parts = std::iter::from_fn(|| {
                let mut part = Vec::with_capacity(PART);
                match (&mut file).take(PART as u64).read_to_end(&mut part) {
                    Ok(0) => None,
                    Ok(_) => Some(Ok(part)),
                    Err(e) => Some(Err(io_err(&tmp)(e))),
                }
            });
            let parts = parts_or_empty(parts);
            let done =
                AttachmentStore::blocking_pg(rt, put_parts(pool, &stored.id, stored.size, parts));
            let _ = std::fs::remove_file(&self.tmp);
            return done.map(|()| stored);
        }
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        let parent = self.store_dir.join(&stored.id[..2]);
        let path = parent.join(&stored.id);
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        if path.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        } else {
            std::fs::rename(&self.tmp, &path).map_err(io_err(&path))?;
            if let Ok(dir) = std::fs::File::open(&parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(stored)
    }
}

/// `parts`, or one empty part when it yields none (a blob has at least one part).
fn parts_or_empty<P: Default>(
    parts: impl Iterator<Item = Result<P, AttachmentError>>,
) -> impl Iterator<Item = Result<P, AttachmentError>> {
    let mut parts = parts.peekable();
    let empty = parts.peek().is_none().then(|| Ok(P::default()));
    empty.into_iter().chain(parts)
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
    fn byte_ranges_are_parsed_and_cut_to_the_size() {
        let r = |h: &str| ByteRange::parse(h);
        assert_eq!(
            r("bytes=0-99"),
            Some(ByteRange::From {
                first: 0,
                last: Some(99)
            })
        );
        assert_eq!(
            r("bytes=100-"),
            Some(ByteRange::From {
                first: 100,
                last: None
            })
        );
        assert_eq!(r("bytes=-5"), Some(ByteRange::Suffix(5)));
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=a-",
            "bytes=-",
            "",
        ] {
            assert_eq!(r(ignored), None, "{ignored}");
        }
        let cut = |h: &str, size| r(h).map(|b| b.within(size).map_err(|e| e.to_string()));
        assert_eq!(cut("bytes=0-99", 50), Some(Ok(0..50)));
        assert_eq!(cut("bytes=10-19", 50), Some(Ok(10..20)));
        assert_eq!(cut("bytes=-5", 50), Some(Ok(45..50)));
        assert_eq!(cut("bytes=-500", 50), Some(Ok(0..50)));
        assert!(matches!(cut("bytes=50-", 50), Some(Err(_))));
        assert!(matches!(cut("bytes=-0", 50), Some(Err(_))));
    }

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
        store
            .check_link(&id, 1060, "a b.txt", "text/plain", sig, 1001)
            .unwrap();
        assert_eq!(store.read(&id).unwrap(), b"hello");
        assert!(matches!(
            store.check_link(&id, 1061, "a b.txt", "text/plain", sig, 1001),
            Err(AttachmentError::BadSignature)
        ));
        assert!(matches!(
            store.check_link(&id, 1060, "a b.txt", "text/html", sig, 1001),
            Err(AttachmentError::BadSignature)
        ));
        assert!(matches!(
            store.check_link(&id, 1060, "a b.txt", "text/plain", sig, 2000),
            Err(AttachmentError::Expired)
        ));
        // The key persists: a reopened store accepts the same link.
        let again = AttachmentStore::open(&dir, "http://h:1", Duration::from_secs(60)).unwrap();
        assert!(again
            .check_link(&id, 1060, "a b.txt", "text/plain", sig, 1001)
            .is_ok());
    }

    #[test]
    fn staged_bytes_are_stored_once_by_the_commit() {
        let dir = std::env::temp_dir().join(format!("mb-att-staged-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = AttachmentStore::open(&dir, "http://h:1", Duration::from_secs(60)).unwrap();
        let mut staged = Staged::default();
        let a = store.stage(&mut staged, b"first".to_vec());
        let again = store.stage(&mut staged, b"first".to_vec());
        let b = store.stage(&mut staged, b"second".to_vec());
        assert_eq!(a, again);
        assert_eq!(staged.blobs.len(), 2);
        assert!(matches!(store.read(&a), Err(AttachmentError::NotFound)));
        store.commit(staged).unwrap();
        assert_eq!(store.read(&a).unwrap(), b"first");
        assert_eq!(store.read(&b).unwrap(), b"second");
        let _ = std::fs::remove_dir_all(&dir);
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
        // Another instance with the same key accepts the link…
        assert!(b
            .check_link(&id, 1060, "f.txt", "text/plain", sig, 1001)
            .is_ok());
        // …one with a key of its own does not; no key file is made when one is configured.
        assert!(matches!(
            own.check_link(&id, 1060, "f.txt", "text/plain", sig, 1001),
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
