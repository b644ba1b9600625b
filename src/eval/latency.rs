//! Latency of a model, measured the same way for every runtime.
//!
//! The protocol: the first [`WARMUP_IMAGES`] images of the dataset are run once each and not
//! counted (first-run allocations, lazy kernel selection, page faults on the weights); then
//! each of the first [`TIMED_IMAGES`] images (all of them when the dataset has fewer) is run
//! alone, as a batch of one, and its wall time recorded. The median and the 95th percentile
//! (nearest rank) of those times are reported in milliseconds, with the intra-op thread count
//! the runtime was given. What each runtime's time includes is stated in
//! [`Latency::measured`]; the evaluation itself (batched, unoptimized for parity) is not
//! what is timed.
//!
//! Latency is a measurement, not a result: two runs of the same stage give other numbers.
//! It is kept out of everything that must be reproducible (COCO metrics, predictions, keys).

use crate::runtime::{ImageBatch, RgbImage};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Images run before timing starts.
pub const WARMUP_IMAGES: usize = 3;

/// Images timed (fewer when the dataset is smaller).
pub const TIMED_IMAGES: usize = 20;

/// Per-image latency of one model on one runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median wall time per image, in milliseconds.
    pub median_ms: f64,
    /// 95th percentile (nearest rank) per image, in milliseconds.
    pub p95_ms: f64,
    /// Images timed.
    pub images: usize,
    /// Images run before timing (not counted).
    pub warmup_images: usize,
    /// Intra-op threads of the runtime.
    pub threads: usize,
    /// What was timed (runtime, its settings, what the time includes).
    pub measured: String,
}

impl Latency {
    /// `12.3 ms (p95 14.0)`.
    pub fn short(&self) -> String {
        format!("{:.1} ms (p95 {:.1})", self.median_ms, self.p95_ms)
    }
}

/// Times `run` on `images` by the protocol of this module. `run` runs one batch and returns
/// the time it took (so that a runtime in another process can report its own compute time).
pub fn measure(
    images: &[RgbImage],
    threads: usize,
    measured: &str,
    run: &mut dyn FnMut(&ImageBatch) -> anyhow::Result<Duration>,
) -> anyhow::Result<Latency> {
    anyhow::ensure!(!images.is_empty(), "no images to time");
    for image in images.iter().take(WARMUP_IMAGES) {
        run(&image.to_batch())?;
    }
    let mut ms = Vec::with_capacity(TIMED_IMAGES);
    for image in images.iter().take(TIMED_IMAGES) {
        ms.push(run(&image.to_batch())?.as_secs_f64() * 1e3);
    }
    let (median_ms, p95_ms) = median_and_p95(&mut ms);
    Ok(Latency {
        median_ms,
        p95_ms,
        images: ms.len(),
        warmup_images: WARMUP_IMAGES.min(images.len()),
        threads,
        measured: measured.to_string(),
    })
}

/// The median (mean of the two middle values for an even count) and the nearest-rank 95th
/// percentile of `values` (sorted in place; not empty).
fn median_and_p95(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    let rank = (0.95 * n as f64).ceil() as usize;
    (median, values[rank.clamp(1, n) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_nearest_rank_p95() {
        let mut v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(median_and_p95(&mut v), (10.5, 19.0));
        assert_eq!(median_and_p95(&mut [3.0]), (3.0, 3.0));
        assert_eq!(median_and_p95(&mut [5.0, 1.0, 3.0]), (3.0, 5.0));
    }

    #[test]
    fn warmup_is_not_counted() {
        let images: Vec<RgbImage> = (0..5).map(|_| RgbImage { height: 1, width: 1, chw: vec![0.0; 3] }).collect();
        let mut calls = 0u64;
        let l = measure(&images, 2, "test", &mut |_| {
            calls += 1;
            Ok(Duration::from_millis(if calls <= WARMUP_IMAGES as u64 { 1000 } else { calls }))
        })
        .unwrap();
        assert_eq!((l.images, l.warmup_images, l.threads), (5, 3, 2));
        assert_eq!((l.median_ms, l.p95_ms), (6.0, 8.0));
    }
}
