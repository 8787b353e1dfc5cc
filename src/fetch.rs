//! Fetching outbound attachments from their URLs.
//!
//! Only http and https; the whole download (all attachments of one message together) is
//! capped at `[outbound] attachment_max_bytes` and each attachment at `attachment_timeout`.
//! Unless `attachment_allow_private` is set, URLs that reach loopback, private, link-local or
//! otherwise internal addresses are refused — checked on the resolved addresses (so a public
//! name pointing inward is refused too) and on every redirect.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::outbound::{AttachmentRef, FailureClass, FetchedAttachment};
use crate::settings::OutboundSection;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("attachment {url} refused: {reason}")]
    Refused { url: String, reason: String },
    #[error("attachment {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("attachment {url} did not arrive within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("attachments are larger than the {limit} bytes allowed per message ([outbound] attachment_max_bytes)")]
    TooLarge { limit: u64 },
    #[error("attachment {url} could not be fetched: {detail}")]
    Network { url: String, detail: String },
}

impl FetchError {
    /// Refused, too large and 4xx will fail again; 5xx, timeouts and network errors may not.
    pub fn class(&self) -> FailureClass {
        match self {
            FetchError::Refused { .. } | FetchError::TooLarge { .. } => FailureClass::Permanent,
            FetchError::Status { status, .. } if *status < 500 => FailureClass::Permanent,
            _ => FailureClass::Transient,
        }
    }
}

/// True for addresses an attachment URL must not reach unless explicitly allowed.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, shared address space
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24, IETF protocol assignments
                || (o[0] & 0xf0) == 240 // 240.0.0.0/4, reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated, still routed inward)
                // Addresses that carry an IPv4 address a gateway may reach: NAT64
                // (64:ff9b::/96), 6to4 (2002::/16), IPv4-compatible (::/96).
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0])
                || s[0] == 0x2002
                || s[..6] == [0, 0, 0, 0, 0, 0]
        }
    }
}

/// Resolves names and drops internal addresses; a name with nothing else left is an error.
struct PublicOnlyResolver;

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_internal(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves only to internal addresses").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn literal_internal(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_internal(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_internal(IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => true,
    }
}

#[derive(Clone)]
pub struct AttachmentFetcher {
    client: reqwest::Client,
    max_bytes: u64,
    timeout: Duration,
    allow_private: bool,
    /// `[outbound] attachments_in_flight_bytes`, in KiB: each request with attachments takes
    /// `attachment_max_bytes` of it before downloading and gives it back when it is done, so
    /// the attachment bytes held by all pipelines together stay within it.
    budget: Arc<tokio::sync::Semaphore>,
    /// What one request takes of it (KiB).
    share: u32,
}

/// A request's attachments, and its share of the in-flight budget (held until this is
/// dropped: after the email built from them is sent).
pub struct Fetched {
    pub attachments: Vec<FetchedAttachment>,
    pub budget: BudgetShare,
}

/// A request's share of the attachment budget; given back when dropped.
pub struct BudgetShare(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

impl AttachmentFetcher {
    pub fn new(cfg: &OutboundSection) -> Result<Self, String> {
        let allow_private = cfg.attachment_allow_private;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.attachment_timeout.0)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("more than 5 redirects")
                } else if !allow_private && literal_internal(attempt.url()) {
                    attempt.error("redirected to an internal address")
                } else {
                    attempt.follow()
                }
            }));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnlyResolver));
        }
        let budget = kib(cfg.attachments_in_flight_bytes)
            .max(kib(cfg.attachment_max_bytes))
            .min(tokio::sync::Semaphore::MAX_PERMITS as u32);
        Ok(Self {
            client: builder.build().map_err(|e| e.to_string())?,
            max_bytes: cfg.attachment_max_bytes,
            timeout: cfg.attachment_timeout.0,
            allow_private,
            budget: Arc::new(tokio::sync::Semaphore::new(budget as usize)),
            share: kib(cfg.attachment_max_bytes).min(budget),
        })
    }

    /// Fetches every attachment, in order, within the per-message size cap, after taking
    /// this request's share of the in-flight budget (waiting for it when others hold it).
    pub async fn fetch_all(&self, refs: &[AttachmentRef]) -> Result<Fetched, FetchError> {
        if refs.is_empty() {
            return Ok(Fetched {
                attachments: Vec::new(),
                budget: BudgetShare(None),
            });
        }
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(self.share)
            .await
            .map_err(|_| FetchError::Network {
                url: String::new(),
                detail: "the attachment budget is closed".into(),
            })?;
        Ok(Fetched {
            attachments: self.fetch_each(refs).await?,
            budget: BudgetShare(Some(permit)),
        })
    }

    async fn fetch_each(
        &self,
        refs: &[AttachmentRef],
    ) -> Result<Vec<FetchedAttachment>, FetchError> {
        let mut out = Vec::with_capacity(refs.len());
        let mut total: u64 = 0;
        for r in refs {
            let bytes = tokio::time::timeout(self.timeout, self.fetch_one(&r.url, &mut total))
                .await
                .map_err(|_| FetchError::Timeout {
                    url: r.url.clone(),
                    timeout: self.timeout,
                })??;
            out.push(FetchedAttachment {
                filename: r.filename.clone(),
                mime_type: r.mime_type.clone(),
                bytes,
            });
        }
        Ok(out)
    }

    async fn fetch_one(&self, url_text: &str, total: &mut u64) -> Result<Vec<u8>, FetchError> {
        let refused = |reason: &str| FetchError::Refused {
            url: url_text.to_string(),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(url_text).map_err(|e| refused(&e.to_string()))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(refused("only http and https URLs are fetched"));
        }
        if !self.allow_private && literal_internal(&url) {
            return Err(refused(
                "it points to an internal address (set [outbound] attachment_allow_private to allow)",
            ));
        }
        let mut resp = self.client.get(url).send().await.map_err(|e| {
            let detail = crate::domain::error_chain(&e);
            if detail.contains("internal address") {
                refused(&format!(
                    "{detail} (set [outbound] attachment_allow_private to allow)"
                ))
            } else {
                FetchError::Network {
                    url: url_text.to_string(),
                    detail,
                }
            }
        })?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url_text.to_string(),
                status,
            });
        }
        if let Some(len) = resp.content_length() {
            if *total + len > self.max_bytes {
                return Err(FetchError::TooLarge {
                    limit: self.max_bytes,
                });
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| FetchError::Network {
            url: url_text.to_string(),
            detail: crate::domain::error_chain(&e),
        })? {
            *total += chunk.len() as u64;
            if *total > self.max_bytes {
                return Err(FetchError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::808:808",
            "2002:7f00:1::",
            "::127.0.0.1",
            "::8.8.8.8",
            "fec0::1",
            "192.0.0.8",
            "240.0.0.1",
            "255.255.255.254",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "93.184.216.34", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn classes_follow_the_cause() {
        let u = || "http://x".to_string();
        assert_eq!(
            FetchError::Status {
                url: u(),
                status: 404
            }
            .class(),
            FailureClass::Permanent
        );
        assert_eq!(
            FetchError::Status {
                url: u(),
                status: 503
            }
            .class(),
            FailureClass::Transient
        );
        assert_eq!(
            FetchError::Timeout {
                url: u(),
                timeout: Duration::from_secs(1)
            }
            .class(),
            FailureClass::Transient
        );
        assert_eq!(
            FetchError::Refused {
                url: u(),
                reason: String::new()
            }
            .class(),
            FailureClass::Permanent
        );
    }
}
