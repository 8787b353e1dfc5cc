//! `kind = "file"`: each email written as an RFC 5322 `.eml` file into `dir` (relative to the
//! tenant file): for development and the shipped example, no mail leaves the machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    Accepted, Fingerprint, Mirror, ParseContext, ProviderConfig, SendError, SendFuture, Transport,
    TransportContext,
};
use crate::outbound::OutgoingEmail;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    dir: Option<PathBuf>,
}

/// A provider that writes files.
#[derive(Debug, Clone)]
pub struct FileProvider {
    pub dir: PathBuf,
}

pub fn parse(table: toml::Table, ctx: &mut ParseContext) -> Option<Arc<dyn ProviderConfig>> {
    let f: Fields = ctx.fields(table)?;
    let Some(dir) = f.dir else {
        ctx.problem("dir", "a provider of kind \"file\" needs `dir`");
        return None;
    };
    Some(Arc::new(FileProvider {
        dir: ctx.path(&dir),
    }))
}

impl ProviderConfig for FileProvider {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn fingerprint(&self, h: &mut Fingerprint) {
        h.add(&self.dir);
    }

    fn mirror(&self) -> Mirror {
        Mirror::default()
    }

    fn transport(&self, _: &TransportContext) -> Result<Box<dyn Transport>, SendError> {
        Ok(Box::new(self.clone()))
    }
}

impl Transport for FileProvider {
    fn send<'a>(&'a self, email: &'a Arc<OutgoingEmail>) -> SendFuture<'a> {
        Box::pin(async move {
            write_eml(&self.dir, email).await?;
            Ok(Accepted {
                provider_message_id: email.rfc_message_id.clone(),
                sent_at: OffsetDateTime::now_utc(),
            })
        })
    }
}

/// Writes `<Message-ID>.eml` (through a temporary file, so a reader never sees half of it).
async fn write_eml(dir: &Path, email: &OutgoingEmail) -> Result<(), SendError> {
    let name: String = email
        .rfc_message_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| SendError::File(format!("{}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(format!("{name}.eml"));
    tokio::fs::write(&tmp, &email.bytes)
        .await
        .map_err(|e| SendError::File(format!("{}: {e}", tmp.display())))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| SendError::File(format!("{}: {e}", path.display())))
}
