//! Edges → frame → [`Measurement`], or a [`DecodeError`] saying what went wrong and what to check.
//!
//! Finding the frame follows the Linux kernel's dht11 driver: the forty bits are the *last*
//! forty low/high pairs before the final low, so it does not matter whether the reader recorded
//! the host's start pulse, the release, or the sensor's response. On top of that this decoder
//! merges repeated levels (an edge the reader missed); measures the line's rise delay from the
//! frame's own lows and takes it out, so a slow line (weak pull-up, long cable) decodes instead
//! of being misread; refuses pulses no sensor sends (stalls, merged pulses, glitches), frames
//! too noisy to decide, and bits too close to the threshold that their neighbours do not
//! confirm; and checks the values against the model's format and range (and refuses the
//! all-zero frame), so a frame that passes has passed several independent checks, not only the
//! 8-bit checksum. publisher/README.md has the rules with their datasheet numbers and the
//! measured rates.

use super::signal::timing::{
    BIT_LOW_US, CLOSE_CALL_NOISE_US, CLOSE_CALL_US, FRAME_BITS, LONG_PULSE_US, MAX_BIT_HIGH_US,
    MAX_BIT_LOW_US, MAX_NOISE_US, MIN_BIT_HIGH_US, MIN_BIT_LOW_US, ONE_HIGH_US,
    ONE_THRESHOLD_HALF_US, SENSOR_MAX_BIT_LOW_US, ZERO_HIGH_US,
};
use super::signal::{Edge, Level, Measurement};
use k3sense_protocol::Model;

/// Why a train of edges did not give a reading. Every variant is a failed read worth retrying;
/// the messages say what to check when it keeps happening.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The line never toggled after the start pulse.
    #[error(
        "no response from the sensor: the data line did not toggle after the start pulse; \
         check the sensor's power and ground, that the data wire is on the configured GPIO \
         (BCM numbering), and the pull-up resistor (4.7–10 kΩ to 3.3 V)"
    )]
    NoResponse,
    /// The line stayed at one level far longer than any pulse of a frame, at input index `edge`.
    #[error(
        "timeout at edge {edge}: the line stopped changing in the middle of the frame; the \
         sensor stopped answering (power, loose wire) or the reader was preempted — the kernel \
         IIO driver (dtoverlay=dht11) avoids the latter"
    )]
    Timeout {
        /// Index in the input slice of the pulse that lasted too long.
        edge: usize,
    },
    /// The line went idle before all forty bits arrived.
    #[error(
        "short frame: {bits} of 40 bits arrived; edges were missed (reader preempted, a read \
         faster than the sensor allows) or the signal is weak (long cable, missing pull-up)"
    )]
    ShortFrame {
        /// How many bits arrived before the line went idle (not counting the response).
        bits: usize,
    },
    /// A pulse inside the frame is not one the sensor sends: too long (edges were lost), too
    /// short (a glitch), or a high the decoder cannot tell apart as a 0 or a 1.
    #[error(
        "bad pulse at edge {edge}: {level:?} for {duration_us} µs inside the frame, where bits \
         are 50 µs low and 26–28 µs (0) or 70 µs (1) high: {fault}"
    )]
    PulseWidth {
        /// Index in the input slice of the offending pulse.
        edge: usize,
        /// The level it was at.
        level: Level,
        /// How long it lasted, as recorded (before correcting for the line's rise delay).
        duration_us: u32,
        /// What is wrong with it.
        fault: PulseFault,
    },
    /// The checksum byte does not match the data bytes.
    #[error(
        "checksum mismatch: the data bytes {bytes:02x?} sum to {expected:#04x} but the sensor \
         sent {actual:#04x}; a bit was misread (timing jitter, electrical noise, a long cable)"
    )]
    Checksum {
        /// The low 8 bits of the sum of the four data bytes.
        expected: u8,
        /// The checksum byte received.
        actual: u8,
        /// The whole frame as received.
        bytes: [u8; 5],
    },
    /// The checksum is right but the bytes do not follow the model's format.
    #[error(
        "the frame {bytes:02x?} passes its checksum but is not {model} data; is the sensor \
         another model (check --sensor dht11|dht22)?"
    )]
    Format {
        /// The model the frame was decoded as.
        model: Model,
        /// The whole frame as received.
        bytes: [u8; 5],
    },
    /// The frame decodes to values the model cannot report.
    #[error(
        "implausible reading {temperature_c} °C, {humidity_pct} %: outside what the sensor can \
         report (0.0 % humidity is what a line that reads only short highs gives: a stuck or \
         noisy data line); is the sensor another model (check --sensor dht11|dht22), or damaged?"
    )]
    Implausible {
        /// The decoded temperature.
        temperature_c: f64,
        /// The decoded humidity.
        humidity_pct: f64,
    },
}

/// What is wrong with a pulse refused as [`DecodeError::PulseWidth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PulseFault {
    /// Longer than any pulse of a bit, even after correcting for a slow line.
    #[error(
        "longer than any the sensor sends; edges were missed (reader preempted) or the line \
         rises too slowly (pull-up too weak or missing, cable too long)"
    )]
    TooLong,
    /// Shorter than any pulse of a bit, even allowing for timing jitter.
    #[error(
        "shorter than any the sensor sends, a glitch; electrical noise on the line (long or \
         unshielded cable near mains or a motor, missing pull-up) or a contact that bounces"
    )]
    TooShort,
    /// Off its nominal width by more than any bit can be and still be decided.
    #[error(
        "off its nominal width by more than 22 µs, so any bit of the frame may have crossed \
         the 0/1 threshold; the reader's timing is that noisy (preemption, a loaded CPU — \
         the kernel IIO driver avoids it) or the line is (cable, pull-up)"
    )]
    Noisy,
    /// A high too close to the 0/1 threshold for the frame's own timing noise.
    #[error(
        "too close to the 0/1 threshold for how noisy this frame's timing is, so the bit is \
         not guessed; the line is noisy or rises too slowly (pull-up 4.7–10 kΩ to 3.3 V, a \
         shorter cable)"
    )]
    Ambiguous,
}

/// One pulse after merging repeated levels, with where it started in the input.
#[derive(Debug, Clone, Copy)]
struct Pulse {
    level: Level,
    duration_us: u32,
    /// Index in the input of the first edge merged into this pulse.
    edge: usize,
}

impl Pulse {
    fn is_long(&self) -> bool {
        self.duration_us >= LONG_PULSE_US
    }

    fn refused(&self, fault: PulseFault) -> DecodeError {
        DecodeError::PulseWidth {
            edge: self.edge,
            level: self.level,
            duration_us: self.duration_us,
            fault,
        }
    }
}

/// Pulses the frame occupies at the end of the train: 40 × (low, high), then the final low.
const WINDOW: usize = 2 * FRAME_BITS + 1;

/// Decodes the edges a reader recorded into a checked [`Measurement`] for `model`.
///
/// The edges may start anywhere before the sensor's response (with or without the host's
/// start pulse and the idle line) and may end with the idle high after the final low.
/// Consecutive edges at the same level, as a reader that missed an edge records them, are
/// treated as one pulse.
pub fn decode(model: Model, edges: &[Edge]) -> Result<Measurement, DecodeError> {
    decode_frame(model, find_frame(edges)?)
}

/// Checks and interprets the five bytes of a frame for `model`.
///
/// DHT11: humidity integer and tenths, temperature integer and tenths. Older DHT11 chips send
/// zero for both tenths bytes; newer ones put the temperature's tenths in the low nibble of
/// byte 3 and a minus sign in its bit 7, which older chips never set, so one rule reads both.
///
/// DHT22/AM2302: 16-bit humidity and temperature in tenths. The datasheet marks a negative
/// temperature with bit 15 (sign and magnitude); some clones send two's complement instead.
/// For every temperature the DHT22 can report (−40.0 to 80.0 °C) the two readings of a word
/// with bit 15 set do not overlap — sign-magnitude gives −0.0…−40.0 only for 0x8000…0x8190,
/// two's complement only for 0xFE70…0xFFFF — so the one that lands in range is chosen and the
/// choice is never ambiguous. Anything else is [`DecodeError::Implausible`], reported with the
/// datasheet's (sign-magnitude) reading.
pub fn decode_frame(model: Model, bytes: [u8; 5]) -> Result<Measurement, DecodeError> {
    let expected = checksum(&bytes);
    if expected != bytes[4] {
        return Err(DecodeError::Checksum {
            expected,
            actual: bytes[4],
            bytes,
        });
    }
    let (temperature_tenths, humidity_tenths) = match model {
        Model::Dht11 => dht11_tenths(bytes).ok_or(DecodeError::Format { model, bytes })?,
        Model::Dht22 => dht22_tenths(bytes),
    };
    let measurement = Measurement {
        temperature_c: f64::from(temperature_tenths) / 10.0,
        humidity_pct: f64::from(humidity_tenths) / 10.0,
    };
    let (t_min, t_max) = model.temperature_range();
    let (h_min, h_max) = model.humidity_range();
    // Humidity 0.0 % is never a reading: a DHT11 measures 20–90 % (newer chips 5–95 %), an
    // AM2302/DHT22's capacitive element does not reach 0.0 % in air, and it is what the all-zero
    // frame decodes to — a line that answered the start pulse and then read only short highs,
    // which passes the checksum (0 + 0 + 0 + 0 = 0).
    let in_range = (t_min..=t_max).contains(&measurement.temperature_c)
        && (h_min..=h_max).contains(&measurement.humidity_pct)
        && humidity_tenths != 0;
    if !in_range {
        return Err(DecodeError::Implausible {
            temperature_c: measurement.temperature_c,
            humidity_pct: measurement.humidity_pct,
        });
    }
    Ok(measurement)
}

/// The low eight bits of the sum of the four data bytes.
pub(super) fn checksum(bytes: &[u8; 5]) -> u8 {
    bytes[..4].iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

/// DHT11 bytes → (temperature, humidity) in tenths, or `None` if they are not DHT11 data:
/// a tenths byte above 9, or bits 4–6 of byte 3 set.
fn dht11_tenths(bytes: [u8; 5]) -> Option<(i32, i32)> {
    let [rh_int, rh_tenths, t_int, t_dec, _] = bytes;
    let t_tenths = t_dec & 0x0f;
    if rh_tenths > 9 || t_tenths > 9 || t_dec & 0x70 != 0 {
        return None;
    }
    let magnitude = i32::from(t_int) * 10 + i32::from(t_tenths);
    let temperature = if t_dec & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    };
    Some((temperature, i32::from(rh_int) * 10 + i32::from(rh_tenths)))
}

/// DHT22 bytes → (temperature, humidity) in tenths; see [`decode_frame`] for the sign rule.
fn dht22_tenths(bytes: [u8; 5]) -> (i32, i32) {
    let humidity = i32::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    let raw = u16::from_be_bytes([bytes[2], bytes[3]]);
    let temperature = if raw & 0x8000 == 0 {
        i32::from(raw)
    } else {
        let sign_magnitude = -i32::from(raw & 0x7fff);
        let twos_complement = i32::from(i16::from_be_bytes([bytes[2], bytes[3]]));
        // The lowest temperature a DHT22 reports is −40.0 °C.
        if sign_magnitude < -400 && twos_complement >= -400 {
            twos_complement
        } else {
            sign_magnitude
        }
    };
    (temperature, humidity)
}

/// Finds the 40-bit frame at the end of the edges and returns its five bytes, unchecked.
fn find_frame(edges: &[Edge]) -> Result<[u8; 5], DecodeError> {
    let mut pulses = merge(edges);
    // The idle line after the final low (or after a sensor that gave up early).
    if pulses.last().is_some_and(|p| p.level == Level::High) {
        pulses.pop();
    }
    // Skip the idle line before the start, then the host's start pulse: a long low. If the
    // line never comes back from it (stuck low) or never toggles after it, nobody answered.
    let mut start = leading_highs(&pulses, 0);
    if pulses.get(start).is_some_and(Pulse::is_long) {
        start += 1;
    }
    start = leading_highs(&pulses, start);
    let Some((final_low, body)) = pulses[start..].split_last() else {
        return Err(DecodeError::NoResponse);
    };
    // After a stall (a long pulse other than the start), only what follows can be the frame.
    let mut frame = body;
    if let Some(stall) = body.iter().rposition(Pulse::is_long) {
        let after = leading_highs(body, stall + 1);
        if body.len() - after < WINDOW - 1 {
            return Err(DecodeError::Timeout {
                edge: body[stall].edge,
            });
        }
        frame = &body[after..];
    }
    if frame.len() < WINDOW - 1 {
        if final_low.is_long() {
            return Err(DecodeError::Timeout {
                edge: final_low.edge,
            });
        }
        // `frame` alternates low, high, … starting low; the first pair is the response.
        let pairs = frame.len() / 2;
        return Err(DecodeError::ShortFrame {
            bits: pairs.saturating_sub(1),
        });
    }
    let bits = &frame[frame.len() - (WINDOW - 1)..];
    let mut line = Line::measure(bits);
    // Widths first, so a lost edge or a glitch is reported as what it is, not as the
    // ambiguous bit its outsized pulse makes elsewhere.
    for pulse in bits {
        line.check_width(pulse)?;
    }
    if line.corrected(final_low) < f64::from(MIN_BIT_LOW_US) {
        return Err(final_low.refused(PulseFault::TooShort));
    }
    // The final low is followed by the idle line, so it may have been recorded longer than it
    // was (a reader that stopped while it was low): it counts only if it looks like a bit low.
    let final_low = (line.corrected(final_low) <= f64::from(MAX_BIT_LOW_US)).then_some(final_low);
    line.measure_noise(bits, final_low)?;
    let mut bytes = [0u8; 5];
    // After merging, levels alternate and `bits` ends just before a low, so it is exactly
    // forty (low, high) pairs; the high of each pair carries the bit.
    for (i, pair) in bits.chunks_exact(2).enumerate() {
        let next_low = bits.get(2 * i + 2).or(final_low);
        if line.is_one(&pair[0], &pair[1], next_low)? {
            bytes[i / 8] |= 0x80 >> (i % 8);
        }
    }
    Ok(bytes)
}

/// What the frame's own pulses say about the line, and the bit decisions that follow.
///
/// Every bit starts with a 50 µs low, whatever its value, so the forty lows of a frame are forty
/// measurements of one known width. Two things are read from the frame:
///
/// - **How late the line rises.** The sensor pulls the line low hard, but the pull-up lifts it
///   back through the cable's capacitance; on a slow line the reader sees every rising edge
///   late by the same delay d, so every low is d too long and every high d too short. A 0's
///   27 µs high then looks like 27 − d and a 1's 70 µs like 70 − d, and past d ≈ 21 µs a fixed
///   49 µs threshold reads 1s as 0s. The median low minus 50 µs is d (the median, so that one
///   odd pulse does not move it); each low is corrected by −d and each high by +d before
///   deciding. Up to [`SENSOR_MAX_BIT_LOW_US`] the median is the sensor's own tolerance and
///   nothing is corrected, nor within three standard errors of that (a noisy frame's median
///   can be a few µs long by chance). (The response's 80 µs low and high would say the same, but they are
///   one measurement, not forty, and a reader may not have recorded them.)
/// - **How noisy the timing is**: the largest distance of any corrected pulse from its nominal
///   width (50 µs for a low, 27 or 70 µs for a high). Past [`MAX_NOISE_US`] the frame is
///   refused: a bit may have crossed the threshold unseen. A high closer to the 48.5 µs threshold
///   than [`CLOSE_CALL_US`] (or than the noise less [`CLOSE_CALL_NOISE_US`], if that is more)
///   is a close call, and is decided only if a second reading of it agrees: the high plus half
///   of how far each of its two neighbouring lows is off. When a reader's timestamp is late,
///   the pulse before it is long and the pulse after it short by the same amount, so a high
///   pushed across the threshold by its two edges leaves its neighbouring lows off in the
///   opposite direction, and the second reading puts it back; a close call they disagree on
///   is refused rather than guessed.
struct Line {
    /// The line's rise delay d, µs (0 on a line within the sensor's tolerance).
    rise: f64,
    /// Half the width of the band around the threshold where a high is a close call, µs.
    close_call: f64,
}

/// The 0/1 threshold on a corrected high, µs: half-way between 27 and 70.
const THRESHOLD: f64 = ONE_THRESHOLD_HALF_US as f64 / 2.0;

impl Line {
    fn measure(bits: &[Pulse]) -> Self {
        let mut lows: Vec<u32> = bits.iter().step_by(2).map(|p| p.duration_us).collect();
        lows.sort_unstable();
        let median_low = match lows.len() {
            0 => f64::from(BIT_LOW_US),
            n if n % 2 == 1 => f64::from(lows[n / 2]),
            n => (f64::from(lows[n / 2 - 1]) + f64::from(lows[n / 2])) / 2.0,
        };
        // The median itself is uncertain on a noisy line (about 1.25 σ/√n): a median a few µs
        // long by chance is not a slow line, and correcting for it would push the highs of a
        // fast line off by as much.
        let n = lows.len().max(1) as f64;
        let mean = lows.iter().map(|l| f64::from(*l)).sum::<f64>() / n;
        let sd = (lows
            .iter()
            .map(|l| (f64::from(*l) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let uncertainty = 3.0 * 1.25 * sd / n.sqrt();
        let rise = if median_low > f64::from(SENSOR_MAX_BIT_LOW_US) + uncertainty {
            median_low - f64::from(BIT_LOW_US)
        } else {
            0.0
        };
        Self {
            rise,
            close_call: f64::from(CLOSE_CALL_US),
        }
    }

    /// Refuses a frame whose timing is too noisy to decide any bit, and otherwise widens the
    /// close-call band by how far its pulses stray from their nominal widths.
    fn measure_noise(
        &mut self,
        bits: &[Pulse],
        final_low: Option<&Pulse>,
    ) -> Result<(), DecodeError> {
        let mut noise = 0.0;
        for pulse in bits.iter().chain(final_low) {
            let deviation = self.deviation(pulse);
            if deviation > f64::from(MAX_NOISE_US) {
                return Err(pulse.refused(PulseFault::Noisy));
            }
            noise = f64::max(noise, deviation);
        }
        self.close_call = self.close_call.max(noise - f64::from(CLOSE_CALL_NOISE_US));
        Ok(())
    }

    /// How far a corrected pulse is from the nearest width a sensor sends at its level.
    fn deviation(&self, pulse: &Pulse) -> f64 {
        let width = self.corrected(pulse);
        match pulse.level {
            Level::Low => (width - f64::from(BIT_LOW_US)).abs(),
            Level::High => (width - f64::from(ZERO_HIGH_US))
                .abs()
                .min((width - f64::from(ONE_HIGH_US)).abs()),
        }
    }

    /// The pulse's width with the rise delay taken out: lows shorter, highs longer.
    fn corrected(&self, pulse: &Pulse) -> f64 {
        let width = f64::from(pulse.duration_us);
        match pulse.level {
            Level::Low => width - self.rise,
            Level::High => width + self.rise,
        }
    }

    /// Refuses a bit pulse longer or shorter than any the sensor sends.
    fn check_width(&self, pulse: &Pulse) -> Result<(), DecodeError> {
        let (min, max) = match pulse.level {
            Level::Low => (MIN_BIT_LOW_US, MAX_BIT_LOW_US),
            Level::High => (MIN_BIT_HIGH_US, MAX_BIT_HIGH_US),
        };
        let width = self.corrected(pulse);
        if width > f64::from(max) {
            return Err(pulse.refused(PulseFault::TooLong));
        }
        if width < f64::from(min) {
            return Err(pulse.refused(PulseFault::TooShort));
        }
        Ok(())
    }

    /// Whether a bit's high is a 1, or an error if it cannot be told apart. `low` is the bit's
    /// own low, `next_low` the one after the high (if it was recorded as a bit low).
    fn is_one(
        &self,
        low: &Pulse,
        high: &Pulse,
        next_low: Option<&Pulse>,
    ) -> Result<bool, DecodeError> {
        let distance = self.corrected(high) - THRESHOLD;
        if distance.abs() > self.close_call {
            return Ok(distance > 0.0);
        }
        // A close call: read it again with the neighbouring lows' errors taken into account.
        let off = |p: &Pulse| self.corrected(p) - f64::from(BIT_LOW_US);
        let neighbours = match next_low {
            Some(next) => (off(low) + off(next)) / 2.0,
            None => off(low),
        };
        let again = distance + neighbours;
        if distance == 0.0 || again == 0.0 || (distance > 0.0) != (again > 0.0) {
            return Err(high.refused(PulseFault::Ambiguous));
        }
        Ok(distance > 0.0)
    }
}

/// Merges consecutive edges at the same level into one pulse (a missed edge looks like that).
fn merge(edges: &[Edge]) -> Vec<Pulse> {
    let mut pulses: Vec<Pulse> = Vec::with_capacity(edges.len());
    for (i, e) in edges.iter().enumerate() {
        match pulses.last_mut() {
            Some(last) if last.level == e.level => {
                last.duration_us = last.duration_us.saturating_add(e.duration_us);
            }
            _ => pulses.push(Pulse {
                level: e.level,
                duration_us: e.duration_us,
                edge: i,
            }),
        }
    }
    pulses
}

/// The index of the first pulse at or after `from` that is not high.
fn leading_highs(pulses: &[Pulse], from: usize) -> usize {
    let mut i = from;
    while pulses.get(i).is_some_and(|p| p.level == Level::High) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dht::{edges_for_frame, encode_frame};

    fn frame(b: [u8; 4]) -> [u8; 5] {
        [
            b[0],
            b[1],
            b[2],
            b[3],
            checksum(&[b[0], b[1], b[2], b[3], 0]),
        ]
    }

    fn m(temperature_c: f64, humidity_pct: f64) -> Measurement {
        Measurement {
            temperature_c,
            humidity_pct,
        }
    }

    /// What a reader that records everything sees: idle, start pulse, release, the sensor's
    /// train, idle.
    fn with_host(edges: Vec<Edge>) -> Vec<Edge> {
        let mut all = vec![Edge::high(5_000), Edge::low(18_000), Edge::high(30)];
        all.extend(edges);
        all.push(Edge::high(1_000));
        all
    }

    #[test]
    fn dht11_old_chip_whole_numbers() {
        // Datasheet example: 0x35 0x00 0x18 0x00 0x4d → 53 %RH, 24 °C.
        let bytes = [0x35, 0x00, 0x18, 0x00, 0x4d];
        assert_eq!(checksum(&bytes), 0x4d);
        let got = decode(Model::Dht11, &edges_for_frame(bytes)).unwrap();
        assert_eq!(got, m(24.0, 53.0));
    }

    #[test]
    fn dht11_new_chip_tenths_and_sign() {
        // 41.0 %RH, 23.4 °C: tenths in byte 3's low nibble.
        let got = decode_frame(Model::Dht11, frame([41, 0, 23, 0x04])).unwrap();
        assert_eq!(got, m(23.4, 41.0));
        // −5.3 °C: bit 7 of byte 3 is the minus sign.
        let got = decode_frame(Model::Dht11, frame([80, 0, 5, 0x83])).unwrap();
        assert_eq!(got, m(-5.3, 80.0));
        // −0.5 °C has a zero integer part.
        let got = decode_frame(Model::Dht11, frame([80, 0, 0, 0x85])).unwrap();
        assert_eq!(got, m(-0.5, 80.0));
        // Humidity tenths in byte 1.
        let got = decode_frame(Model::Dht11, frame([55, 7, 21, 0])).unwrap();
        assert_eq!(got, m(21.0, 55.7));
        // The same through edges, with the host's part of the train.
        let edges = with_host(edges_for_frame(frame([80, 0, 5, 0x83])));
        assert_eq!(decode(Model::Dht11, &edges).unwrap(), m(-5.3, 80.0));
    }

    #[test]
    fn dht22_datasheet_positive() {
        // AM2302 datasheet: 0x02 0x8c 0x01 0x5f 0xee → 65.2 %RH, 35.1 °C.
        let bytes = [0x02, 0x8c, 0x01, 0x5f, 0xee];
        let got = decode(Model::Dht22, &with_host(edges_for_frame(bytes))).unwrap();
        assert_eq!(got, m(35.1, 65.2));
    }

    #[test]
    fn dht22_datasheet_negative_sign_magnitude() {
        // AM2302 datasheet: temperature 0x80 0x65 → −10.1 °C.
        let got = decode_frame(Model::Dht22, frame([0x02, 0x8c, 0x80, 0x65])).unwrap();
        assert_eq!(got, m(-10.1, 65.2));
        // The bottom of the range, −40.0 °C = 0x8190.
        let got = decode_frame(Model::Dht22, frame([0x03, 0xe8, 0x81, 0x90])).unwrap();
        assert_eq!(got, m(-40.0, 100.0));
        // −0.0 is 0.0.
        let got = decode_frame(Model::Dht22, frame([0x01, 0x00, 0x80, 0x00])).unwrap();
        assert_eq!(got.temperature_c, 0.0);
    }

    #[test]
    fn dht22_clone_twos_complement() {
        // −10.1 °C as two's complement: −101 = 0xff9b.
        let got = decode_frame(Model::Dht22, frame([0x02, 0x8c, 0xff, 0x9b])).unwrap();
        assert_eq!(got, m(-10.1, 65.2));
        // −0.1 °C = 0xffff, −40.0 °C = 0xfe70.
        let got = decode_frame(Model::Dht22, frame([0x02, 0x8c, 0xff, 0xff])).unwrap();
        assert_eq!(got.temperature_c, -0.1);
        let got = decode_frame(Model::Dht22, frame([0x02, 0x8c, 0xfe, 0x70])).unwrap();
        assert_eq!(got.temperature_c, -40.0);
        // Between the two encodings' ranges: neither reading is a DHT22 temperature.
        let err = decode_frame(Model::Dht22, frame([0x02, 0x8c, 0xfe, 0x6f])).unwrap_err();
        assert!(matches!(err, DecodeError::Implausible { .. }), "{err}");
        let err = decode_frame(Model::Dht22, frame([0x02, 0x8c, 0x81, 0x91])).unwrap_err();
        assert!(matches!(err, DecodeError::Implausible { .. }), "{err}");
    }

    #[test]
    fn dht22_sign_readings_never_overlap() {
        // The heuristic is exact: no word with bit 15 set is in range under both readings.
        for raw in 0x8000u16..=0xffff {
            let sm = -i32::from(raw & 0x7fff);
            let tc = i32::from(i16::from_be_bytes(raw.to_be_bytes()));
            assert!(!(sm >= -400 && tc >= -400), "{raw:#06x}");
        }
    }

    #[test]
    fn edges_with_and_without_the_host_part() {
        let bytes = encode_frame(Model::Dht22, m(-12.3, 45.6));
        let sensor = edges_for_frame(bytes);
        let want = m(-12.3, 45.6);
        // Exactly what the sensor sends.
        assert_eq!(decode(Model::Dht22, &sensor).unwrap(), want);
        // Everything a reader might record around it.
        assert_eq!(
            decode(Model::Dht22, &with_host(sensor.clone())).unwrap(),
            want
        );
        // The response missed (a reader that started late), like the kernel driver allows.
        assert_eq!(decode(Model::Dht22, &sensor[2..]).unwrap(), want);
        // Only the response low missed.
        assert_eq!(decode(Model::Dht22, &sensor[1..]).unwrap(), want);
        // Extra pulses before the frame are ignored: the frame is the last 40 bits.
        let mut noisy = vec![Edge::low(10), Edge::high(10), Edge::low(40)];
        noisy.extend(sensor.iter().copied());
        assert_eq!(decode(Model::Dht22, &noisy).unwrap(), want);
    }

    #[test]
    fn split_pulses_merge_back() {
        // A reader that records the level twice in a row (a missed interrupt between two
        // samples of the same level) gives the same frame.
        let bytes = encode_frame(Model::Dht11, m(22.0, 40.0));
        let mut edges = Vec::new();
        for e in edges_for_frame(bytes) {
            let half = e.duration_us / 2;
            edges.push(Edge {
                duration_us: half,
                ..e
            });
            edges.push(Edge {
                duration_us: e.duration_us - half,
                ..e
            });
        }
        assert_eq!(decode(Model::Dht11, &edges).unwrap(), m(22.0, 40.0));
    }

    #[test]
    fn no_response() {
        for edges in [
            vec![],
            vec![Edge::high(10_000)],
            // Start pulse, then the line stays high.
            vec![Edge::low(18_000), Edge::high(10_000)],
            vec![Edge::high(100), Edge::low(18_000), Edge::high(30)],
            // Stuck low: the start pulse never ends.
            vec![Edge::low(18_000), Edge::low(50_000)],
        ] {
            assert_eq!(
                decode(Model::Dht11, &edges),
                Err(DecodeError::NoResponse),
                "{edges:?}"
            );
        }
    }

    #[test]
    fn timeout_mid_frame() {
        let sensor = edges_for_frame(encode_frame(Model::Dht11, m(20.0, 50.0)));
        // The line held low for 5 ms after bit 10 started: the reader or sensor stalled.
        let mut edges = with_host(sensor[..2 + 20].to_vec());
        edges.pop(); // the idle
        let stall = edges.len();
        edges.push(Edge::low(5_000));
        edges.extend(sensor[2 + 21..].iter().copied());
        assert_eq!(
            decode(Model::Dht11, &edges),
            Err(DecodeError::Timeout { edge: stall })
        );
        // The sensor stops with the line low and the reader gives up.
        let mut edges = sensor[..2 + 40].to_vec();
        edges.push(Edge::low(2_000));
        assert_eq!(
            decode(Model::Dht11, &edges),
            Err(DecodeError::Timeout { edge: 42 })
        );
        assert!(
            DecodeError::Timeout { edge: 42 }
                .to_string()
                .contains("edge 42")
        );
    }

    #[test]
    fn short_frame() {
        let sensor = edges_for_frame(encode_frame(Model::Dht11, m(20.0, 50.0)));
        // Response and 25 bits, then the line goes idle.
        let mut edges = with_host(sensor[..2 + 50].to_vec());
        edges.pop();
        edges.push(Edge::low(50));
        edges.push(Edge::high(5_000));
        assert_eq!(
            decode(Model::Dht11, &edges),
            Err(DecodeError::ShortFrame { bits: 25 })
        );
        // The response only.
        let edges = vec![Edge::low(80), Edge::high(80), Edge::low(50)];
        assert_eq!(
            decode(Model::Dht11, &edges),
            Err(DecodeError::ShortFrame { bits: 0 })
        );
    }

    #[test]
    fn lost_edge_inside_frame_is_a_bad_pulse() {
        let sensor = edges_for_frame(encode_frame(Model::Dht11, m(20.0, 50.0)));
        // Drop the edge between bit 5's low and high: they merge into one long low, and the
        // next bit's low too.
        let mut edges = sensor.clone();
        let i = 2 + 2 * 5;
        edges[i].duration_us += edges[i + 1].duration_us;
        edges.remove(i + 1);
        let err = decode(Model::Dht11, &edges).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::PulseWidth {
                    level: Level::Low,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("preempted"));
    }

    #[test]
    fn checksum_mismatch_reports_both_values() {
        let err = decode_frame(Model::Dht11, [0x35, 0x00, 0x18, 0x00, 0x4e]).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Checksum {
                expected: 0x4d,
                actual: 0x4e,
                bytes: [0x35, 0x00, 0x18, 0x00, 0x4e],
            }
        );
        let text = err.to_string();
        assert!(text.contains("0x4d") && text.contains("0x4e"), "{text}");
        // Through edges: the checksum wraps at 8 bits.
        let bytes = [200, 100, 0, 0, 44];
        assert_eq!(checksum(&bytes), 44);
    }

    #[test]
    fn dht11_format_errors() {
        // A DHT22 frame read as DHT11: humidity tenths of 140.
        let bytes = [0x02, 0x8c, 0x01, 0x5f, 0xee];
        assert_eq!(
            decode_frame(Model::Dht11, bytes),
            Err(DecodeError::Format {
                model: Model::Dht11,
                bytes
            })
        );
        // Bits 4–6 of byte 3 are never set by a DHT11.
        assert!(matches!(
            decode_frame(Model::Dht11, frame([50, 0, 20, 0x10])),
            Err(DecodeError::Format { .. })
        ));
        assert!(matches!(
            decode_frame(Model::Dht11, frame([50, 0, 20, 0x0a])),
            Err(DecodeError::Format { .. })
        ));
    }

    #[test]
    fn implausible_values() {
        // DHT11: 61 °C, −20.1 °C, 100.1 %.
        for (b, t, h) in [
            ([50, 0, 61, 0], 61.0, 50.0),
            ([50, 0, 20, 0x81], -20.1, 50.0),
            ([100, 1, 20, 0], 20.0, 100.1),
        ] {
            assert_eq!(
                decode_frame(Model::Dht11, frame(b)),
                Err(DecodeError::Implausible {
                    temperature_c: t,
                    humidity_pct: h
                })
            );
        }
        // A DHT11 frame read as DHT22: humidity 0x3500 / 10 = 1356.8 %.
        let err = decode_frame(Model::Dht22, [0x35, 0x00, 0x18, 0x00, 0x4d]).unwrap_err();
        assert!(matches!(err, DecodeError::Implausible { .. }), "{err}");
        assert!(err.to_string().contains("--sensor"));
        // DHT22 80.1 °C.
        assert!(matches!(
            decode_frame(Model::Dht22, frame([0x01, 0x00, 0x03, 0x21])),
            Err(DecodeError::Implausible { .. })
        ));
    }

    #[test]
    fn threshold_is_the_kernel_drivers() {
        let bytes = [0x35, 0x00, 0x18, 0x00, 0x4d];
        let mut edges = edges_for_frame(bytes);
        // Stretch every 0 to 48 µs and shrink every 1 to 49 µs: still the same bits.
        for e in edges.iter_mut().skip(2).filter(|e| e.level == Level::High) {
            e.duration_us = if e.duration_us == ZERO_HIGH_US {
                48
            } else {
                49
            };
        }
        assert_eq!(decode(Model::Dht11, &edges).unwrap(), m(24.0, 53.0));
    }

    /// The sensor's train for `bytes` as a slow line shows it: every low `d` µs longer and
    /// every high `d` µs shorter (the rising edges late); a high that would last 0 µs or less
    /// is not seen (the decoder merges the lows around it).
    fn slow(bytes: [u8; 5], d: u32) -> Vec<Edge> {
        edges_for_frame(bytes)
            .into_iter()
            .map(|e| match e.level {
                Level::Low => Edge::low(e.duration_us + d),
                Level::High => Edge::high(e.duration_us.saturating_sub(d)),
            })
            .filter(|e| e.duration_us > 0)
            .collect()
    }

    #[test]
    fn the_all_zero_frame_and_zero_humidity_are_refused() {
        // A line that answers the start pulse and then reads only short highs: all bits 0, and
        // 0 + 0 + 0 + 0 = 0 passes the checksum.
        for model in [Model::Dht11, Model::Dht22] {
            let err = decode(model, &with_host(edges_for_frame([0; 5]))).unwrap_err();
            assert_eq!(
                err,
                DecodeError::Implausible {
                    temperature_c: 0.0,
                    humidity_pct: 0.0
                }
            );
            assert!(err.to_string().contains("short highs"), "{err}");
        }
        // 0.0 % with any temperature: no DHT reports it.
        assert!(matches!(
            decode_frame(Model::Dht22, frame([0, 0, 0x00, 0xfa])),
            Err(DecodeError::Implausible { .. })
        ));
        assert!(matches!(
            decode_frame(Model::Dht11, frame([0, 0, 21, 0])),
            Err(DecodeError::Implausible { .. })
        ));
        // 0.1 % and 0.0 °C are readings.
        assert_eq!(
            decode_frame(Model::Dht22, frame([0, 1, 0, 0])),
            Ok(m(0.0, 0.1))
        );
    }

    #[test]
    fn a_slow_line_is_corrected_not_misread() {
        // 53 %, 24 °C has 1s and 0s in every byte but the tenths.
        let bytes = [0x35, 0x00, 0x18, 0x00, 0x4d];
        for d in [0, 5, 6, 12, 18, 21, 22] {
            assert_eq!(
                decode(Model::Dht11, &with_host(slow(bytes, d))),
                Ok(m(24.0, 53.0)),
                "d = {d}"
            );
        }
        // At d = 22 a 1's high is 48 µs: the kernel's fixed 49 µs rule would read every 1 as
        // a 0, and the all-zero frame would pass its checksum.
        assert!(
            slow(bytes, 22)[2..]
                .iter()
                .all(|e| e.level == Level::Low || e.duration_us < 49)
        );
        // Past 27 µs a 0's high is gone altogether; the merged lows are refused.
        assert!(decode(Model::Dht11, &slow(bytes, 27)).is_err());
    }

    #[test]
    fn a_glitch_is_refused() {
        let sensor = edges_for_frame(encode_frame(Model::Dht22, m(21.3, 45.6)));
        // A 2 µs low splits bit 10's high.
        let at = 2 + 2 * 10 + 1;
        let high = sensor[at].duration_us;
        let mut edges = sensor[..at].to_vec();
        edges.extend([Edge::high(10), Edge::low(2), Edge::high(high - 12)]);
        edges.extend(&sensor[at + 1..]);
        let err = decode(Model::Dht22, &edges).unwrap_err();
        assert_eq!(
            err,
            DecodeError::PulseWidth {
                edge: at + 1,
                level: Level::Low,
                duration_us: 2,
                fault: PulseFault::TooShort
            }
        );
        assert!(err.to_string().contains("glitch"), "{err}");
        // A 2 µs spike up splits bit 20's low: one half is shorter than 25 µs.
        let at = 2 + 2 * 20;
        let mut edges = sensor[..at].to_vec();
        edges.extend([Edge::low(20), Edge::high(2), Edge::low(28)]);
        edges.extend(&sensor[at + 1..]);
        assert!(matches!(
            decode(Model::Dht22, &edges),
            Err(DecodeError::PulseWidth {
                fault: PulseFault::TooShort,
                ..
            })
        ));
        // A glitch in the idle line after the frame makes a 2 µs "final low".
        let mut edges = sensor.clone();
        edges.extend([Edge::high(30), Edge::low(2), Edge::high(500)]);
        assert!(matches!(
            decode(Model::Dht22, &edges),
            Err(DecodeError::PulseWidth {
                fault: PulseFault::TooShort,
                ..
            })
        ));
    }

    #[test]
    fn a_close_call_is_refused_when_its_neighbours_disagree() {
        let bytes = [0x35, 0x00, 0x18, 0x00, 0x4d];
        let sensor = edges_for_frame(bytes);
        // Bit 0 is a 0 (0x35 = 0b0011_0101). Its low 50 µs, its high stretched to 41 µs, the
        // next low 72 µs: the frame's noise (22 µs) makes every high within 10 µs of the 48.5
        // µs threshold a close call. Read with its neighbours' errors (0 and +22 µs, half of
        // it) the high is 52.5 µs, a 1: the two readings disagree, the bit is not guessed.
        let mut edges = sensor.clone();
        edges[3] = Edge::high(41);
        edges[4] = Edge::low(72);
        let err = decode(Model::Dht11, &edges).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::PulseWidth {
                    edge: 3,
                    fault: PulseFault::Ambiguous,
                    ..
                }
            ),
            "{err:?}"
        );
        // The same high next to lows that are on time is a 0 both ways.
        let mut edges = sensor.clone();
        edges[3] = Edge::high(41);
        edges[8] = Edge::low(72);
        assert_eq!(decode(Model::Dht11, &edges), Ok(m(24.0, 53.0)));
    }

    #[test]
    fn a_frame_too_noisy_to_decide_is_refused() {
        let mut edges = edges_for_frame([0x35, 0x00, 0x18, 0x00, 0x4d]);
        // One low 23 µs longer than 50 µs: a bit elsewhere may have crossed the threshold.
        edges[30] = Edge::low(73);
        let err = decode(Model::Dht11, &edges).unwrap_err();
        assert_eq!(
            err,
            DecodeError::PulseWidth {
                edge: 30,
                level: Level::Low,
                duration_us: 73,
                fault: PulseFault::Noisy
            }
        );
        // 22 µs off is still decided.
        edges[30] = Edge::low(72);
        assert_eq!(decode(Model::Dht11, &edges), Ok(m(24.0, 53.0)));
    }

    #[test]
    fn a_sensor_with_54us_lows_is_not_corrected() {
        // Some DHT11 clones send 54 µs lows; with the datasheet's 48–55 µs tolerance that is the
        // sensor, not the line, and nothing is corrected.
        let edges: Vec<Edge> = edges_for_frame([0x35, 0x00, 0x18, 0x00, 0x4d])
            .into_iter()
            .map(|e| match (e.level, e.duration_us) {
                (Level::Low, 50) => Edge::low(54),
                _ => e,
            })
            .collect();
        assert_eq!(decode(Model::Dht11, &edges), Ok(m(24.0, 53.0)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A reading the model can report, at its resolution (tenths).
        fn reading(model: Model) -> impl Strategy<Value = Measurement> {
            let (t_min, t_max) = model.temperature_range();
            let (h_min, h_max) = model.humidity_range();
            let t = (t_min * 10.0) as i32..=(t_max * 10.0) as i32;
            // 0.0 % is refused (the all-zero frame); 0.1 % is the lowest reading.
            let h = ((h_min * 10.0) as i32).max(1)..=(h_max * 10.0) as i32;
            (t, h).prop_map(|(t, h)| Measurement {
                temperature_c: f64::from(t) / 10.0,
                humidity_pct: f64::from(h) / 10.0,
            })
        }

        fn model() -> impl Strategy<Value = Model> {
            prop_oneof![Just(Model::Dht11), Just(Model::Dht22)]
        }

        fn model_and_reading() -> impl Strategy<Value = (Model, Measurement)> {
            model().prop_flat_map(|model| (Just(model), reading(model)))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn jittered_reading_decodes_to_itself(
                (model, want) in model_and_reading(),
                jitter in proptest::collection::vec(-15i32..=15, 83),
                host in any::<bool>(),
            ) {
                let mut edges = edges_for_frame(encode_frame(model, want));
                for (e, j) in edges.iter_mut().zip(&jitter) {
                    e.duration_us = e.duration_us.saturating_add_signed(*j);
                }
                if host {
                    edges = with_host(edges);
                }
                prop_assert_eq!(decode(model, &edges), Ok(want));
            }

            #[test]
            fn any_single_flipped_bit_is_rejected(
                (model, reading) in model_and_reading(),
                bit in 0usize..40,
            ) {
                let mut bytes = encode_frame(model, reading);
                bytes[bit / 8] ^= 0x80 >> (bit % 8);
                // A single flip changes exactly one byte by a power of two, so the sum of the
                // data bytes and the checksum byte can no longer agree: always the checksum.
                let err = decode(model, &edges_for_frame(bytes));
                prop_assert!(matches!(err, Err(DecodeError::Checksum { .. })), "{:?}", err);
            }

            #[test]
            fn arbitrary_edges_never_panic_and_results_are_in_range(
                model in model(),
                edges in proptest::collection::vec(
                    (any::<bool>(), prop_oneof![0u32..150, 0u32..30_000, any::<u32>()]),
                    0..200,
                ),
            ) {
                let edges: Vec<Edge> = edges
                    .into_iter()
                    .map(|(high, d)| if high { Edge::high(d) } else { Edge::low(d) })
                    .collect();
                if let Ok(got) = decode(model, &edges) {
                    let (t_min, t_max) = model.temperature_range();
                    prop_assert!((t_min..=t_max).contains(&got.temperature_c));
                }
            }
        }
    }
}
