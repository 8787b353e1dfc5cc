//! Encoding of outgoing text parts (the HTML body and its text alternative).
//!
//! lettre chooses a part's Content-Transfer-Encoding by scanning it, converts its line endings
//! in place and then quoted-printable-encodes it byte by byte: together about a tenth of the
//! service's CPU per 4 KB HTML email (issue 7's profile). [`text_body`] makes the same choice
//! and the same encoding in one pass over runs of bytes, and hands lettre the finished body.

use lettre::message::header::ContentTransferEncoding;
use lettre::message::Body;

/// Longest line of a 7bit part, and of quoted-printable content before a soft break (RFC 2045
/// allows 76 characters per encoded line, the `=` of a soft break included).
const LINE: usize = 75;

/// The body of a text part: `7bit` when it is ASCII in short lines without NUL, else
/// `quoted-printable` when that stays compact (mostly ASCII text), else base64 — chosen here,
/// never left to lettre, which sends short ASCII text as `7bit` whatever control bytes it
/// holds. Line endings become CRLF.
pub fn text_body(text: String) -> Body {
    let bytes = text.as_bytes();
    if bytes.is_ascii() && short_lines(bytes) && !bytes.contains(&0) {
        return Body::dangerous_pre_encoded(crlf(bytes), ContentTransferEncoding::SevenBit);
    }
    let escaped = bytes.iter().filter(|&&b| !LITERAL[usize::from(b)]).count();
    if escaped <= bytes.len() / 3 {
        return Body::dangerous_pre_encoded(
            quoted_printable(&text),
            ContentTransferEncoding::QuotedPrintable,
        );
    }
    match Body::new_with_encoding(text, ContentTransferEncoding::Base64) {
        Ok(body) => body,
        // Base64 takes any bytes: not reached.
        Err(bytes) => Body::new(bytes),
    }
}

/// The bytes quoted-printable writes as themselves (space and tab except at the end of a
/// line), as a table: this is looked up for every byte of every email.
static LITERAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b' ' | b'\t' | 33..=60 | 62..=126);
        b += 1;
    }
    t
};

/// The lines of `bytes` without their breaks, the last being what follows the last LF. LF and
/// CRLF are breaks; a CR anywhere else is part of its line.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', bytes)
        .map(Some)
        .chain(std::iter::once(None))
        .map(move |end| match end {
            Some(end) => {
                let line = &bytes[start..end];
                start = end + 1;
                line.strip_suffix(b"\r").unwrap_or(line)
            }
            None => &bytes[start..],
        })
}

/// Every line at most [`LINE`] long, and no lone CR.
fn short_lines(bytes: &[u8]) -> bool {
    lines(bytes).all(|l| l.len() <= LINE && memchr::memchr(b'\r', l).is_none())
}

/// `\n` (and `\r\n`) line endings as CRLF.
fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32 + 2);
    for (n, line) in lines(bytes).enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(line);
    }
    out
}

/// Quoted-printable (RFC 2045 §6.7) with CRLF hard line breaks: runs of literal bytes are
/// copied whole, lines are soft-broken before 76 characters, an escape is never split, and
/// whitespace at the end of a line is escaped.
pub fn quoted_printable(text: &str) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16 + 16);
    for (n, line) in lines(bytes).enumerate() {
        if n > 0 {
            out.extend_from_slice(b"\r\n");
        }
        // Trailing whitespace would be lost in transit: it is escaped.
        let literal_end = match line.last() {
            Some(b' ' | b'\t') => line.len() - 1,
            _ => line.len(),
        };
        let mut col = 0;
        let mut i = 0;
        while i < line.len() {
            if col == LINE {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            // Literal bytes, as many as fit on this output line.
            let room = (LINE - col).min(literal_end.saturating_sub(i));
            let run = line[i..i + room]
                .iter()
                .position(|&b| !LITERAL[usize::from(b)])
                .unwrap_or(room);
            if run > 0 {
                out.extend_from_slice(&line[i..i + run]);
                col += run;
                i += run;
                continue;
            }
            if col + 3 > LINE {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            let b = line[i];
            out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            col += 3;
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes quoted-printable the way a mail client does.
    fn decode(qp: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < qp.len() {
            match qp[i] {
                b'=' if qp[i + 1..].starts_with(b"\r\n") => i += 3,
                b'=' => {
                    let hex = std::str::from_utf8(&qp[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        out
    }

    fn check_qp(text: &str) {
        let qp = quoted_printable(text);
        let expected = text.replace("\r\n", "\n").replace('\n', "\r\n");
        assert_eq!(
            String::from_utf8(decode(&qp)).unwrap(),
            expected,
            "{text:?}"
        );
        for line in qp.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= 76, "{:?}", String::from_utf8_lossy(line));
            assert!(line.is_ascii() && !line.ends_with(b" ") && !line.ends_with(b"\t"));
        }
    }

    #[test]
    fn quoted_printable_round_trips_and_keeps_lines_short() {
        check_qp("");
        check_qp("a = b\n");
        check_qp("trailing space \nand tab\t\r\nend ");
        check_qp(&"x".repeat(300));
        check_qp(&"é".repeat(100));
        check_qp(&format!("{}=é {}", "y".repeat(73), "z".repeat(80)));
        let html =
            "<p style=\"color: red\">Grüße, thank you for your order — it ships today.</p>\n";
        check_qp(&html.repeat(40));
        for n in 70..80 {
            check_qp(&format!("{}={}", "a".repeat(n), " ".repeat(n % 3)));
        }
    }

    #[test]
    fn quoted_printable_round_trips_random_text() {
        let pieces = [
            "a",
            "word ",
            "=",
            " ",
            "\t",
            "\r\n",
            "\n",
            "\r",
            "é",
            "日",
            "x".repeat(70).leak(),
            "<p class=\"c\">",
            ".",
            "\u{0}",
        ];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let len = next() % 40;
            let text: String = (0..len)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            // A lone CR is not a line break: it is escaped and comes back as itself.
            check_qp(&text);
        }
    }

    #[test]
    fn a_mail_reader_gets_the_parts_back_as_written() {
        let html = format!(
            "<html><body>\n{}<p>Grüße = regards; trailing space </p>\n</body></html>",
            "<p>Dear customer, thank you for your order. It arrives within three days.</p>\n"
                .repeat(30)
        );
        let text = "Short lines\nonly here\n".to_string();
        let email = lettre::Message::builder()
            .from("a@example.com".parse().unwrap())
            .to("b@example.com".parse().unwrap())
            .subject("s")
            .multipart(lettre::message::MultiPart::alternative_plain_html(
                text_body(text.clone()),
                text_body(html.clone()),
            ))
            .unwrap()
            .formatted();
        let parsed = mail_parser::MessageParser::default()
            .parse(&email[..])
            .unwrap();
        assert_eq!(parsed.body_html(0).unwrap(), html.replace('\n', "\r\n"));
        assert_eq!(parsed.body_text(0).unwrap(), text.replace('\n', "\r\n"));
    }

    #[test]
    fn the_encoding_follows_the_content() {
        let short = text_body("Hello\nWorld\r\n".into());
        assert_eq!(short.encoding(), ContentTransferEncoding::SevenBit);
        assert_eq!(short.into_vec(), b"Hello\r\nWorld\r\n");
        let long = text_body("a".repeat(200));
        assert_eq!(long.encoding(), ContentTransferEncoding::QuotedPrintable);
        let german = text_body("Grüße aus Köln, bis bald".into());
        assert_eq!(german.encoding(), ContentTransferEncoding::QuotedPrintable);
        assert_eq!(
            german.into_vec(),
            b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, bis bald"
        );
        let japanese = text_body("日本語のメールです".into());
        assert_eq!(japanese.encoding(), ContentTransferEncoding::Base64);
    }
}
