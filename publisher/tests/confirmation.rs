#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Decoder + read policy together, on frames hit by double-bit errors — the errors the checksum
//! cannot always catch (5–6 % of double flips pass it, ~2.5 % also pass the format and range
//! checks).
//!
//! Every read's frame is the true value's (the datasheet encoding, `encode_frame`), and with
//! probability one half two distinct random bits of its 40 are flipped; the edges go through the
//! real decoder (`dht::decode`) and the outcome through the real [`ReadPolicy`] at the times it
//! asks for. A published value is *wrong* when it is further from the truth than the model's
//! tolerance (an error within it, one step of the sensor's resolution, cannot be told from the
//! sensor's own noise by any number of reads). Also counted: how many wrong values the decoder
//! alone let through, which shows what the confirmation catches.

use std::time::Duration;

use k3sense_protocol::Model;
use k3sense_publisher::{
    Pacing, ReadCounters, ReadPolicy, Tolerance, Verdict,
    dht::{self, Measurement},
    policy::PolicyConfig,
    sensor::ReadError,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

/// Reads per model: at a half of them corrupted, ~10,000 frames with a double-bit error each.
const READS: usize = 20_000;

fn truth(model: Model, rng: &mut StdRng) -> Measurement {
    match model {
        Model::Dht11 => Measurement {
            temperature_c: f64::from(rng.random_range(0..=50)),
            humidity_pct: f64::from(rng.random_range(20..=90)),
        },
        Model::Dht22 => Measurement {
            temperature_c: f64::from(rng.random_range(-400..=800)) / 10.0,
            humidity_pct: f64::from(rng.random_range(0..=1000)) / 10.0,
        },
    }
}

/// (published, wrong published, wrong values the decoder accepted).
fn run(model: Model, seed: u64) -> (u64, u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let tolerance = Tolerance::for_model(model);
    let pacing = Pacing::for_model(model);
    let t0 = Instant::now();
    let mut policy = ReadPolicy::new(
        PolicyConfig {
            model,
            interval: Duration::from_secs(10),
            pacing,
        },
        t0,
        ReadCounters::default(),
    );
    let mut value = truth(model, &mut rng);
    let (mut published, mut wrong, mut decoder_wrong) = (0, 0, 0);
    for read in 0..READS {
        // A new true value now and then (the room changes between intervals).
        if read % 40 == 0 {
            value = truth(model, &mut rng);
        }
        let mut frame = dht::encode_frame(model, value);
        if rng.random_bool(0.5) {
            let a = rng.random_range(0..40);
            let b = (a + rng.random_range(1..40)) % 40;
            for bit in [a, b] {
                frame[bit / 8] ^= 0x80 >> (bit % 8);
            }
        }
        let outcome = dht::decode(model, &dht::edges_for_frame(frame)).map_err(ReadError::from);
        if let Ok(m) = &outcome
            && !tolerance.agree(*m, value)
        {
            decoder_wrong += 1;
        }
        let at = policy.next_read_at();
        if let Verdict::Publish(m) = policy.record(at, outcome.as_ref().copied()) {
            published += 1;
            if !tolerance.agree(m, value) {
                wrong += 1;
                eprintln!("{model}: published {m:?} for the true {value:?}");
            }
        }
    }
    (published, wrong, decoder_wrong)
}

#[tokio::test(start_paused = true)]
async fn double_bit_errors_that_pass_the_decoder_are_never_published() {
    for (model, seed) in [(Model::Dht11, 11), (Model::Dht22, 22)] {
        let (published, wrong, decoder_wrong) = run(model, seed);
        eprintln!(
            "{model}: {READS} reads, half with two flipped bits: the decoder accepted {decoder_wrong} \
             wrong values, the policy published {published} readings, {wrong} of them wrong"
        );
        assert!(
            decoder_wrong > 0,
            "the test must exercise wrong frames the decoder accepts"
        );
        assert!(published > 1_000, "{published}");
        assert_eq!(wrong, 0, "{model}: wrong values were published");
    }
}
