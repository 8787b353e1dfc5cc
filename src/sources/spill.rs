//! [`RawSink`]: where the pieces of an email too large for memory go.

use super::{blocking, SourceError, HEADER_CAP, PIECE};
use crate::attachments::{AttachmentStore, RawWriter, StoredRaw};

/// Where the pieces of an email too large for memory go: the attachment store (hashed as
/// written), or only a hash. Pieces are gathered to [`PIECE`] and written on the blocking
/// pool.
pub struct RawSink {
    target: SinkTarget,
    buf: Vec<u8>,
    /// The first [`HEADER_CAP`] bytes pushed: the start of the email's header.
    head: Vec<u8>,
}

enum SinkTarget {
    Store(Option<RawWriter>),
    Hash(aws_lc_rs::digest::Context, u64),
}

impl RawSink {
    pub fn store(store: &AttachmentStore) -> Result<Self, SourceError> {
        Ok(Self {
            target: SinkTarget::Store(Some(store.writer()?)),
            buf: Vec::new(),
            head: Vec::new(),
        })
    }

    pub fn hash() -> Self {
        Self {
            target: SinkTarget::Hash(
                aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
                0,
            ),
            buf: Vec::new(),
            head: Vec::new(),
        }
    }

    pub async fn push(&mut self, bytes: &[u8]) -> Result<(), SourceError> {
        let room = HEADER_CAP.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= PIECE {
            self.flush().await?;
        }
        Ok(())
    }

    /// The start of what was pushed (at most [`HEADER_CAP`] bytes).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match &mut self.target {
            SinkTarget::Store(slot) => {
                let Some(mut writer) = slot.take() else {
                    return Err(SourceError::Task("the raw writer is gone".into()));
                };
                let data = std::mem::take(&mut self.buf);
                let (writer, mut data) = blocking(move || {
                    let r = writer.write(&data);
                    r.map(|()| (writer, data))
                })
                .await??;
                data.clear();
                *slot = Some(writer);
                self.buf = data;
            }
            SinkTarget::Hash(ctx, size) => {
                ctx.update(&self.buf);
                *size += self.buf.len() as u64;
                self.buf.clear();
            }
        }
        Ok(())
    }

    pub async fn finish(mut self) -> Result<StoredRaw, SourceError> {
        self.flush().await?;
        match self.target {
            SinkTarget::Store(slot) => {
                let writer =
                    slot.ok_or_else(|| SourceError::Task("the raw writer is gone".into()))?;
                Ok(blocking(move || writer.finish()).await??)
            }
            SinkTarget::Hash(ctx, size) => Ok(StoredRaw {
                id: ctx
                    .finish()
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                size,
            }),
        }
    }
}
