//! Arbitrary bytes as an MQTT state payload → `Reading::from_json`: it must never panic, and
//! whatever it accepts must validate and survive an encode/decode round trip unchanged — so the
//! gateway can never forward something the contract forbids.

#![no_main]

use k3sense_protocol::Reading;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(reading) = Reading::from_json(data) else {
        return;
    };
    assert!(reading.validate().is_ok(), "accepted an invalid reading: {reading:?}");
    let json = reading.to_json().expect("an accepted reading encodes");
    assert!(json.len() <= k3sense_protocol::MAX_PAYLOAD_BYTES);
    let again = Reading::from_json(json.as_bytes()).expect("an encoded reading decodes");
    assert_eq!(again, reading);
});
