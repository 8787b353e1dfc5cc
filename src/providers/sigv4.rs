//! AWS Signature Version 4 for a request with its whole body at hand (`Authorization` header,
//! `x-amz-date`, payload hashed), on aws-lc-rs' SHA-256 and HMAC. Checked against AWS's
//! published Signature Version 4 test suite.

use aws_lc_rs::{digest, hmac};
use time::OffsetDateTime;

/// Who signs, and for which service and region.
pub struct SigningCredentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

/// The headers to add to the request.
#[derive(Debug)]
pub struct Signature {
    pub authorization: String,
    pub amz_date: String,
    /// For tests and debugging: what was signed.
    pub canonical_request: String,
    pub string_to_sign: String,
}

/// Signs `method url` with `headers` (sent as given; `host` and `x-amz-date` are added to
/// the signed ones, and must not be in `headers`) and `payload`, at `at`.
pub fn sign(
    creds: &SigningCredentials,
    method: &str,
    url: &url::Url,
    headers: &[(&str, &str)],
    payload: &[u8],
    at: OffsetDateTime,
) -> Signature {
    let amz_date = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    let date = &amz_date[..8];
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    };
    let mut canonical: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), header_value(v)))
        .collect();
    canonical.push(("host".into(), host));
    canonical.push(("x-amz-date".into(), amz_date.clone()));
    canonical.sort();
    let signed_headers = canonical
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let header_lines: String = canonical
        .iter()
        .map(|(n, v)| format!("{n}:{v}\n"))
        .collect();
    let canonical_request = format!(
        "{method}\n{}\n{}\n{header_lines}\n{signed_headers}\n{}",
        uri_encode(url.path(), false),
        canonical_query(url),
        hex(digest::digest(&digest::SHA256, payload).as_ref()),
    );
    let scope = format!("{date}/{}/{}/aws4_request", creds.region, creds.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let mut key = hmac_sha256(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    for part in [creds.region, creds.service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex(&hmac_sha256(&key, string_to_sign.as_bytes()));
    Signature {
        authorization: format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id
        ),
        amz_date,
        canonical_request,
        string_to_sign,
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A header value trimmed, its runs of spaces made one.
fn header_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SigV4's URI encoding: everything but the unreserved characters (and `/` in a path) as
/// `%XX`. Applied to the already encoded path, it encodes it twice, as every service but S3
/// wants.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The query's pairs encoded and sorted by name, then value.
fn canonical_query(url: &url::Url) -> String {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (uri_encode(&k, true), uri_encode(&v, true)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    // AWS Signature Version 4 test suite (docs.aws.amazon.com/general/latest/gr/
    // signature-v4-test-suite.html, as kept in awslabs/aws-c-auth's tests): the example
    // credentials, region, service and date every case uses.
    const SUITE: SigningCredentials = SigningCredentials {
        access_key_id: "AKIDEXAMPLE",
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region: "us-east-1",
        service: "service",
    };

    #[test]
    fn get_vanilla_matches_the_test_suite() {
        let url = url::Url::parse("https://example.amazonaws.com/").unwrap();
        let s = sign(
            &SUITE,
            "GET",
            &url,
            &[],
            b"",
            datetime!(2015-08-30 12:36:00 UTC),
        );
        assert_eq!(
            s.canonical_request,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            s.string_to_sign,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
        assert_eq!(
            s.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert_eq!(s.amz_date, "20150830T123600Z");
    }

    #[test]
    fn post_vanilla_and_query_order_match_the_test_suite() {
        let at = datetime!(2015-08-30 12:36:00 UTC);
        let url = url::Url::parse("https://example.amazonaws.com/").unwrap();
        let s = sign(&SUITE, "POST", &url, &[], b"", at);
        assert!(
            s.authorization.ends_with(
                "SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
            ),
            "{}",
            s.authorization
        );
        let url =
            url::Url::parse("https://example.amazonaws.com/?Param2=value2&Param1=value1").unwrap();
        let s = sign(&SUITE, "GET", &url, &[], b"", at);
        assert!(
            s.authorization.ends_with(
                "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
            ),
            "{}",
            s.authorization
        );
    }
}
