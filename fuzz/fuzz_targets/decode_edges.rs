//! Arbitrary bytes → an edge train → `decode`: it must never panic, and whatever it accepts must
//! be a reading the model can report that survives a round trip through the encoder.
//!
//! Input format (also how the seed corpus is written): byte 0 picks the model (even: DHT11,
//! odd: DHT22); then two bytes per edge, `[a, b]`: bit 7 of `a` is the level (1 = high); if bit 6
//! of `a` is set the duration is `(a & 0x3f) << 8 | b` µs (up to 16 ms), otherwise `b` µs.

#![no_main]

use k3sense_publisher::dht::{Edge, Level, Model, decode, edges_for_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let model = if first & 1 == 0 {
        Model::Dht11
    } else {
        Model::Dht22
    };
    let edges: Vec<Edge> = rest
        .chunks_exact(2)
        .map(|pair| {
            let (a, b) = (pair[0], pair[1]);
            let level = if a & 0x80 != 0 {
                Level::High
            } else {
                Level::Low
            };
            let duration_us = if a & 0x40 != 0 {
                u32::from(a & 0x3f) << 8 | u32::from(b)
            } else {
                u32::from(b)
            };
            Edge { level, duration_us }
        })
        .collect();
    if let Ok(m) = decode(model, &edges) {
        let (t_min, t_max) = model.temperature_range();
        let (h_min, h_max) = model.humidity_range();
        assert!((t_min..=t_max).contains(&m.temperature_c), "{m:?}");
        assert!((h_min..=h_max).contains(&m.humidity_pct), "{m:?}");
        let again = decode(model, &edges_for_frame(encode_frame(model, m)));
        assert_eq!(again, Ok(m));
    }
});
