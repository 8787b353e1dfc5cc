//! Coverage-guided fuzzing of a received email: parse it into the inbound message, serialize
//! that to JSON, and take its dedup key. A panic is a finding (tests/fuzz.rs checks the other
//! properties on what this saves).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mailbridge::inbound::{self, Origin};

const ORIGIN: Origin<'static> = Origin {
    tenant_id: "t",
    provider_id: "p",
    mailbox_id: "m",
    user_id: "u",
    source: "imap",
    received_at: None,
};

fuzz_target!(|raw: &[u8]| {
    if let Ok((email, _)) = inbound::parse(raw, &ORIGIN) {
        serde_json::to_vec(&email).expect("the inbound email serializes");
    }
    let _ = inbound::dedup_key(raw);
});
