//! Coverage-guided fuzzing of an `email.send` request: decode (with its ids), validate, and
//! build the email, its attachments taken from the input's own bytes. A panic is a finding
//! (tests/fuzz.rs checks the other properties on what this saves).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mailbridge::outbound::{self, FetchedAttachment};

fuzz_target!(|body: &[u8]| {
    let (decoded, _ids) = outbound::decode_with_ids(body);
    let _ = outbound::RequestIds::peek(body);
    let Ok(request) = decoded else { return };
    let Ok(valid) = request.validate() else {
        return;
    };
    let attachments = valid
        .request
        .attachments
        .iter()
        .enumerate()
        .map(|(i, a)| FetchedAttachment {
            filename: a.filename.clone(),
            mime_type: a.mime_type.clone(),
            bytes: body[body.len() * i / 4..].to_vec(),
        })
        .collect();
    let _ = outbound::build_email(&valid, attachments);
});
