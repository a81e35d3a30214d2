//! The inverse of decoding: what a sensor sends for a measurement. Used by the simulator and
//! the tests; the decoder never depends on it.

use super::decode::checksum;
use super::signal::timing::{
    BIT_LOW_US, FINAL_LOW_US, ONE_HIGH_US, RESPONSE_HIGH_US, RESPONSE_LOW_US, ZERO_HIGH_US,
};
use super::signal::{Edge, Measurement};
use k3sense_protocol::Model;

/// The five bytes, checksum included, that a `model` sensor sends for `m`.
///
/// Values are rounded to tenths. DHT11 frames use the newer chips' format (tenths in byte 3's
/// low nibble, minus sign in its bit 7), which is byte for byte the older chips' format for
/// whole, non-negative values. DHT22 frames use the datasheet's sign-magnitude temperature.
/// Values are clamped only to what the bytes can hold, not to the model's range, so a test can
/// build frames the decoder must refuse as implausible; NaN encodes as 0.
pub fn encode_frame(model: Model, m: Measurement) -> [u8; 5] {
    let temperature = tenths(m.temperature_c);
    let humidity = tenths(m.humidity_pct).clamp(0, i64::from(u16::MAX));
    let negative = temperature < 0;
    let magnitude = i64::try_from(temperature.unsigned_abs().min(0xffff)).unwrap_or(0);
    let mut bytes = match model {
        Model::Dht11 => {
            let humidity = humidity.min(2559);
            let magnitude = magnitude.min(2559);
            let sign = if negative { 0x80 } else { 0 };
            [
                low_byte(humidity / 10),
                low_byte(humidity % 10),
                low_byte(magnitude / 10),
                sign | low_byte(magnitude % 10),
                0,
            ]
        }
        Model::Dht22 => {
            let [h_hi, h_lo] = u16::try_from(humidity).unwrap_or(u16::MAX).to_be_bytes();
            let magnitude = u16::try_from(magnitude.min(0x7fff)).unwrap_or(0x7fff);
            let sign = if negative { 0x8000 } else { 0 };
            let [t_hi, t_lo] = (sign | magnitude).to_be_bytes();
            [h_hi, h_lo, t_hi, t_lo, 0]
        }
    };
    bytes[4] = checksum(&bytes);
    bytes
}

/// The ideal edge train a sensor sends for `frame`: the response (80 µs low, 80 µs high), then
/// for each of the 40 bits, most significant first, 50 µs low and 27 µs (0) or 70 µs (1) high,
/// then the final 50 µs low. Not included: the host's start pulse and the idle line around it.
pub fn edges_for_frame(frame: [u8; 5]) -> Vec<Edge> {
    let mut edges = Vec::with_capacity(2 + 2 * 40 + 1);
    edges.push(Edge::low(RESPONSE_LOW_US));
    edges.push(Edge::high(RESPONSE_HIGH_US));
    for byte in frame {
        for bit in (0..8).rev() {
            let one = byte >> bit & 1 == 1;
            edges.push(Edge::low(BIT_LOW_US));
            edges.push(Edge::high(if one { ONE_HIGH_US } else { ZERO_HIGH_US }));
        }
    }
    edges.push(Edge::low(FINAL_LOW_US));
    edges
}

/// `value` in tenths, rounded; saturates, and NaN is 0.
fn tenths(value: f64) -> i64 {
    (value * 10.0).round() as i64
}

fn low_byte(value: i64) -> u8 {
    u8::try_from(value & 0xff).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dht::Level;

    fn m(temperature_c: f64, humidity_pct: f64) -> Measurement {
        Measurement {
            temperature_c,
            humidity_pct,
        }
    }

    #[test]
    fn datasheet_frames() {
        assert_eq!(
            encode_frame(Model::Dht11, m(24.0, 53.0)),
            [0x35, 0x00, 0x18, 0x00, 0x4d]
        );
        assert_eq!(
            encode_frame(Model::Dht22, m(35.1, 65.2)),
            [0x02, 0x8c, 0x01, 0x5f, 0xee]
        );
        assert_eq!(
            encode_frame(Model::Dht22, m(-10.1, 65.2)),
            [0x02, 0x8c, 0x80, 0x65, 0x73]
        );
        assert_eq!(
            encode_frame(Model::Dht11, m(-5.3, 80.0)),
            [80, 0, 5, 0x83, 80 + 5 + 0x83]
        );
    }

    #[test]
    fn out_of_range_values_are_clamped_to_the_bytes() {
        assert_eq!(
            encode_frame(Model::Dht11, m(1e9, -3.0))[..4],
            [0, 0, 255, 9]
        );
        assert_eq!(encode_frame(Model::Dht11, m(f64::NAN, f64::NAN)), [0; 5]);
        assert_eq!(
            encode_frame(Model::Dht22, m(-1e9, 1e9))[..4],
            [0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn edge_train_shape() {
        let edges = edges_for_frame([0x80, 0, 0, 0, 0x80]);
        assert_eq!(edges.len(), 83);
        assert_eq!(edges[0], Edge::low(80));
        assert_eq!(edges[1], Edge::high(80));
        assert_eq!(edges[2], Edge::low(50));
        assert_eq!(edges[3], Edge::high(70));
        assert_eq!(edges[5], Edge::high(27));
        assert_eq!(edges[82], Edge::low(50));
        // Levels alternate, starting low.
        for (i, e) in edges.iter().enumerate() {
            let want = if i % 2 == 0 { Level::Low } else { Level::High };
            assert_eq!(e.level, want);
        }
    }
}
