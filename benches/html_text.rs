//! Issue 14: the cost of the text/plain alternative of an HTML body. Times the converter as
//! it was (`old`, copied here), the corrected one-pass converter
//! (`mailbridge::outbound::html_to_text`) and the `html2text` crate on three bodies (the
//! guide's, a ~5 KB marketing email, a ~50 KB newsletter), prints µs per call and its share
//! of a 100 µs-per-email service budget, then which of the issue's correctness points each
//! output meets. It does not pass or fail.
//!
//! `cargo bench --bench html_text` (release). `HTML_TEXT_MS` sets the time per measurement
//! (default 300 ms; the best of 5 is printed); `HTML_TEXT_ONLY=new` (`old`, `html2text`) times
//! one alone, for a profiler; `HTML_TEXT_SHOW=1` prints each output of the marketing email.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// The service's CPU per sent email in the release throughput benchmark (README, Performance).
const BUDGET_US: f64 = 100.0;

/// A converter under test.
type Converter = fn(&str) -> String;

fn html2text(html: &str) -> String {
    html2text::from_read(html.as_bytes(), 80).unwrap_or_default()
}

fn new(html: &str) -> String {
    mailbridge::outbound::html_to_text(html)
}

/// The converter before issue 14, as it was in src/outbound.rs.
fn old(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut skip_until: Option<&str> = None;
    let mut rest = html;
    while !rest.is_empty() {
        let stop = rest
            .bytes()
            .position(|b| b == b'<' || b == b'&')
            .unwrap_or(rest.len());
        if skip_until.is_none() {
            out.push_str(&rest[..stop]);
        }
        rest = &rest[stop..];
        if let Some(after) = rest.strip_prefix('<') {
            let (tag, next) = after.split_once('>').unwrap_or((after, ""));
            rest = next;
            let closing = tag.starts_with('/');
            let body = tag.trim_start_matches('/');
            let name = &body[..body
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(body.len())];
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            if let Some(end) = skip_until {
                if closing && is(end) {
                    skip_until = None;
                }
                continue;
            }
            if !closing {
                if let Some(end) = ["script", "style", "head"].into_iter().find(|n| is(n)) {
                    skip_until = Some(end);
                    continue;
                }
            }
            const BLOCKS: [&str; 13] = [
                "p",
                "div",
                "tr",
                "h1",
                "h2",
                "h3",
                "h4",
                "h5",
                "h6",
                "ul",
                "ol",
                "table",
                "blockquote",
            ];
            if is("br") || (closing && BLOCKS.into_iter().any(is)) {
                out.push('\n');
            } else if !closing && is("li") {
                out.push_str("\n- ");
            }
        } else if let Some(after) = rest.strip_prefix('&') {
            if skip_until.is_some() {
                rest = after;
                continue;
            }
            // An entity: the characters that start within its first 9 bytes, then `;`.
            let limit = after
                .char_indices()
                .find(|(i, _)| *i > 8)
                .map(|(i, _)| i)
                .unwrap_or(after.len());
            let ent_len = after[..limit].find(';').unwrap_or(limit);
            let ent = &after[..ent_len];
            let terminated = after[ent_len..].starts_with(';');
            rest = if terminated {
                &after[ent_len + 1..]
            } else {
                &after[ent_len..]
            };
            let decoded = match ent {
                _ if !terminated => None,
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                    .ok()
                    .and_then(char::from_u32),
                e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            match decoded {
                Some(d) => out.push(d),
                None => {
                    out.push('&');
                    out.push_str(ent);
                    if terminated {
                        out.push(';');
                    }
                }
            }
        }
    }
    collapse_whitespace(&out)
}

fn collapse_whitespace(s: &str) -> String {
    let mut text = String::with_capacity(s.len());
    let ascii = s.is_ascii();
    let mut blank = 0;
    for line in s.lines() {
        let before = text.len();
        if ascii {
            // `char::is_whitespace` on ASCII, without decoding UTF-8.
            let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
            let bytes = line.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                while i < bytes.len() && is_space(bytes[i]) {
                    i += 1;
                }
                let start = i;
                while i < bytes.len() && !is_space(bytes[i]) {
                    i += 1;
                }
                if start < i {
                    if text.len() > before {
                        text.push(' ');
                    }
                    text.push_str(&line[start..i]);
                }
            }
        } else {
            for w in line.split_whitespace() {
                if text.len() > before {
                    text.push(' ');
                }
                text.push_str(w);
            }
        }
        if text.len() == before {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        text.push('\n');
    }
    let trimmed = text.trim();
    if trimmed.len() == text.len() {
        text
    } else {
        trimmed.to_string()
    }
}

/// A ~5 KB marketing email as ESPs send them: doctype, head with styles, MSO conditional
/// comments, nested layout tables with inline styles, buttons, entities, a footer.
fn marketing() -> String {
    let mut h = String::from(
        r#"<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml"><head>
<meta http-equiv="Content-Type" content="text/html; charset=UTF-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>Spring sale &ndash; up to 40% off</title>
<style type="text/css">body{margin:0;padding:0}table,td{border-collapse:collapse}.btn a{color:#ffffff!important}@media only screen and (max-width:600px){.col{width:100%!important}}</style>
<!--[if mso]><style>td{font-family:Arial,sans-serif}</style><![endif]-->
</head>
<body style="margin:0;padding:0;background-color:#f4f4f4;">
<div style="display:none;max-height:0;overflow:hidden;">Our spring sale starts today &mdash; don&rsquo;t miss it&hellip;</div>
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="background-color:#f4f4f4;">
<tr><td align="center" style="padding:20px 0;">
<!--[if mso]><table role="presentation" width="600"><tr><td><![endif]-->
<table role="presentation" width="600" cellpadding="0" cellspacing="0" border="0" style="background:#ffffff;max-width:600px;">
<tr><td style="padding:10px 20px;font-size:12px;color:#888888;" align="right"><a href="https://mail.example.com/view?id=8f3a&amp;u=42" style="color:#888888;text-decoration:underline;">View in browser</a></td></tr>
<tr><td align="center" style="padding:20px;"><a href="https://www.example.com/?utm_source=email&amp;utm_medium=newsletter&amp;utm_campaign=spring"><img src="https://cdn.example.com/logo.png" width="160" height="40" alt="Example &amp; Co." style="display:block;border:0;"></a></td></tr>
<tr><td style="padding:0 30px 20px 30px;font-family:Arial,Helvetica,sans-serif;font-size:16px;line-height:24px;color:#333333;">
<h1 style="font-size:28px;line-height:34px;margin:0 0 16px 0;color:#111111;">Hi Jos&eacute;, spring is here &#127800;</h1>
<p style="margin:0 0 12px 0;">For one week only, everything in our spring collection is up to <strong>40&nbsp;%</strong> off. Prices &lt; &euro;50 ship free &ndash; and members get early access.</p>
<p style="margin:0 0 12px 0;">&ldquo;The best jacket I&rsquo;ve owned&rdquo; &mdash; Anna, verified buyer &#9733;&#9733;&#9733;&#9733;&#9733;</p>
</td></tr>
"#,
    );
    for (name, old, new) in [
        ("Linen shirt", "59,00", "35,40"),
        ("Canvas sneakers", "79,00", "47,40"),
    ] {
        h.push_str(&format!(
            r#"<tr><td style="padding:10px 30px;"><table role="presentation" width="100%" cellpadding="0" cellspacing="0"><tr>
<td class="col" width="180" valign="top" style="padding-right:20px;"><img src="https://cdn.example.com/p/{0}.jpg" width="160" alt="{name}" style="display:block;border-radius:4px;"></td>
<td class="col" valign="top" style="font-family:Arial,sans-serif;font-size:15px;line-height:22px;color:#333333;"><strong>{name}</strong><br><span style="text-decoration:line-through;color:#999999;">&euro;{old}</span>&nbsp;&euro;{new}<br>
<table role="presentation" cellpadding="0" cellspacing="0" style="margin-top:8px;"><tr><td class="btn" bgcolor="{1}" style="border-radius:4px;"><a href="https://www.example.com/p/{0}?utm_source=email&amp;utm_campaign=spring" style="display:inline-block;padding:10px 18px;color:#ffffff;text-decoration:none;font-weight:bold;">Shop now &rarr;</a></td></tr></table>
</td></tr></table></td></tr>
"#,
            name.to_lowercase().replace(' ', "-"),
            "#e4572e",
        ));
    }
    h.push_str(
        r#"<tr><td style="padding:20px 30px;"><table role="presentation" width="100%" style="border:1px solid #eeeeee;font-family:Arial,sans-serif;font-size:14px;">
<tr><th align="left" style="padding:6px;">Order total</th><th align="left" style="padding:6px;">Shipping</th></tr>
<tr><td style="padding:6px;">&lt; &euro;50</td><td style="padding:6px;">&euro;4,95</td></tr>
<tr><td style="padding:6px;">&ge; &euro;50</td><td style="padding:6px;">free</td></tr>
</table></td></tr>
<tr><td style="padding:20px 30px;font-family:Arial,sans-serif;font-size:12px;line-height:18px;color:#888888;" align="center">
<a href="https://facebook.com/example"><img src="https://cdn.example.com/fb.png" width="24" alt="Facebook"></a>&nbsp;<a href="https://instagram.com/example"><img src="https://cdn.example.com/ig.png" width="24" alt="Instagram"></a><br><br>
&copy; 2026 Example &amp; Co. GmbH &middot; Hauptstra&szlig;e 1 &middot; 10115 Berlin<br>
You receive this email because you signed up at example.com. <a href="https://mail.example.com/unsubscribe?u=42&amp;l=7" style="color:#888888;">Unsubscribe</a> &middot; <a href="https://www.example.com/privacy" style="color:#888888;">Privacy policy</a> &middot; <a href="mailto:help@example.com" style="color:#888888;">help@example.com</a>
</td></tr>
</table>
<!--[if mso]></td></tr></table><![endif]-->
</td></tr></table>
</body></html>
"#,
    );
    h
}

/// A ~50 KB newsletter: a header, many articles (heading, paragraphs, a link, a data table
/// now and then), a footer.
fn newsletter() -> String {
    let mut h = String::from(
        r#"<!DOCTYPE html><html><head><meta charset="utf-8"><title>Weekly digest</title><style>h2{font-size:20px}p{margin:0 0 10px}</style></head><body style="font-family:Georgia,serif;">
<table width="100%" cellpadding="0" cellspacing="0"><tr><td align="center"><table width="640" cellpadding="0" cellspacing="0">
<tr><td style="padding:24px;font-size:26px;">The Weekly Digest &mdash; issue #212</td></tr>
"#,
    );
    let mut n = 0;
    while h.len() < 49_000 {
        n += 1;
        h.push_str(&format!(
            r#"<tr><td style="padding:12px 24px;border-top:1px solid #dddddd;">
<h2 style="font-family:Arial,sans-serif;color:#222222;margin:0 0 8px;">{n}. Markets, models &amp; the week&rsquo;s long reads</h2>
<p style="font-size:16px;line-height:25px;color:#333333;">Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor incididunt ut labore et dolore magna aliqua &ndash; ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.</p>
<p style="font-size:16px;line-height:25px;color:#333333;">Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. &ldquo;Excepteur sint occaecat cupidatat non proident,&rdquo; sunt in culpa qui officia deserunt mollit anim id est laborum. <a href="https://news.example.org/{n}?ref=digest&amp;issue=212" style="color:#1a73e8;">Read more&nbsp;&raquo;</a></p>
"#
        ));
        if n % 4 == 0 {
            h.push_str(
                r#"<table cellpadding="4" style="font-size:14px;"><tr><th>Index</th><th>Close</th><th>Change</th></tr><tr><td>DAX</td><td>18&#8239;204</td><td>+0,4&nbsp;%</td></tr><tr><td>S&amp;P&nbsp;500</td><td>5&#8239;117</td><td>&minus;0,2&nbsp;%</td></tr></table>
"#,
            );
        }
        h.push_str("</td></tr>\n");
    }
    h.push_str(r#"<tr><td style="padding:24px;font-size:12px;color:#777777;">&copy; 2026 Digest Media &middot; <a href="https://news.example.org/unsubscribe?u=42">Unsubscribe</a></td></tr></table></td></tr></table></body></html>"#);
    h
}

/// Microseconds per call of `f` on `html`: the best of 5 runs of `ms` each.
fn time_us(f: Converter, html: &str, ms: u64) -> f64 {
    // Warm up (and build lazy tables).
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(ms / 4) {
        black_box(f(black_box(html)));
    }
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut calls = 0u64;
            while start.elapsed() < Duration::from_millis(ms) {
                for _ in 0..16 {
                    black_box(f(black_box(html)));
                }
                calls += 16;
            }
            start.elapsed().as_secs_f64() * 1e6 / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// The issue's correctness points: a name, an HTML input and a test of the output.
type Check = (&'static str, &'static str, fn(&str) -> bool);

fn checks() -> Vec<Check> {
    vec![
        (
            "named entities (HTML5 table)",
            "a&hellip;b &euro;5 &CounterClockwiseContourIntegral; &rsquo;",
            |t| {
                t.contains("a\u{2026}b")
                    && t.contains("\u{20ac}5")
                    && t.contains('\u{2233}')
                    && t.contains('\u{2019}')
            },
        ),
        (
            "legacy entities without ;",
            "&copy 2026 Example &amp Co",
            |t| t.contains("\u{a9} 2026") && t.contains("Example & Co"),
        ),
        (
            "numeric references (HTML5)",
            "x&#0;&#xD800;&#x80;&#150;&#x1F600;&#65",
            |t| t.contains("x\u{fffd}\u{fffd}\u{20ac}\u{2013}\u{1f600}A"),
        ),
        (
            "table cells separated",
            "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>",
            |t| {
                let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                !t.contains("ab")
                    && lines.iter().any(|l| l.contains('a') && l.contains('b'))
                    && !lines.iter().any(|l| l.contains('b') && l.contains('c'))
            },
        ),
        (
            "link target kept (decoded)",
            r#"<p><a href="https://shop.example/x?a=1&amp;b=2">Shop now</a></p>"#,
            |t| t.contains("Shop now") && t.contains("https://shop.example/x?a=1&b=2"),
        ),
        (
            "no target when text = url",
            r#"<p><a href="https://example.com/">https://example.com</a></p>"#,
            |t| t.matches("example.com").count() == 1,
        ),
        ("comment skipped", "<p>a<!-- a > b -->c</p>", |t| {
            t.trim() == "ac"
        }),
        (
            "attribute with > skipped",
            r#"<p><a title="x>y" href="https://u.example/">t</a></p>"#,
            |t| !t.contains("y\"") && !t.contains("y&quot;") && t.contains('t'),
        ),
        ("literal < kept", "<p>a < b and c</p>", |t| {
            t.contains("a < b and c")
        }),
        (
            "script/style/title skipped",
            "<title>T</title><style>p{x}</style><script>s()</script><p>ok</p>",
            |t| t.trim() == "ok",
        ),
        ("hr is a line break", "<p>a<hr>b</p>", |t| {
            t.lines().any(|l| l.trim() == "a") && t.lines().any(|l| l.trim() == "b")
        }),
    ]
}

fn main() {
    let ms = std::env::var("HTML_TEXT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let bodies = [
        ("guide <p>Hello World</p>", "<p>Hello World</p>".to_string()),
        ("marketing email", marketing()),
        ("newsletter", newsletter()),
    ];
    let candidates: [(&str, Converter); 3] = [("old", old), ("new", new), ("html2text", html2text)];

    println!("html_to_text: µs per call (best of 5 × {ms} ms), and share of a {BUDGET_US} µs/email budget");
    println!(
        "{:<26} {:>8} | {:>9} {:>7} | {:>9} {:>7} | {:>9} {:>7} | {:>8}",
        "body", "bytes", "old µs", "%", "new µs", "%", "html2text", "%", "new-old"
    );
    for (name, html) in &bodies {
        // `HTML_TEXT_ONLY=new` (old, html2text) times that one alone (for a profiler).
        let only = std::env::var("HTML_TEXT_ONLY").ok();
        let us: Vec<f64> = candidates
            .iter()
            .map(|(c, f)| match &only {
                Some(o) if o != c => f64::NAN,
                _ => time_us(*f, html, ms),
            })
            .collect();
        println!(
            "{:<26} {:>8} | {:>9.2} {:>6.1}% | {:>9.2} {:>6.1}% | {:>9.2} {:>6.1}% | {:>+7.2}",
            name,
            html.len(),
            us[0],
            us[0] / BUDGET_US * 100.0,
            us[1],
            us[1] / BUDGET_US * 100.0,
            us[2],
            us[2] / BUDGET_US * 100.0,
            us[1] - us[0],
        );
    }

    println!();
    println!("correctness points (yes = the output meets it)");
    println!(
        "{:<30} {:>5} {:>5} {:>9}",
        "point", "old", "new", "html2text"
    );
    let checks = checks();
    let mut met = [0; 3];
    for (point, html, ok) in &checks {
        let r: Vec<bool> = candidates.iter().map(|(_, f)| ok(&f(html))).collect();
        for (m, r) in met.iter_mut().zip(&r) {
            *m += usize::from(*r);
        }
        let yn = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "{:<30} {:>5} {:>5} {:>9}",
            point,
            yn(r[0]),
            yn(r[1]),
            yn(r[2])
        );
    }
    println!(
        "{:<30} {:>5} {:>5} {:>9}",
        format!("met (of {})", checks.len()),
        met[0],
        met[1],
        met[2]
    );
    if std::env::var_os("HTML_TEXT_SHOW").is_some() {
        for (name, f) in &candidates {
            println!("\n===== {name}: marketing email =====\n{}", f(&bodies[1].1));
        }
    }
}
