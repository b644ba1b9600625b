//! PyTorch vs ONNX: the four headline COCO metrics, their differences and verdicts
//! (`comparison.json` and the terminal table).

use serde::{Deserialize, Serialize};

/// The metrics compared, as named in `comparison.json`.
pub const COMPARED: [&str; 4] = ["AP", "AP50", "AP75", "AR100"];

/// The headline metrics of one side.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Headline {
    /// AP @[.50:.95].
    #[serde(rename = "AP")]
    pub ap: f64,
    /// AP @.50.
    #[serde(rename = "AP50")]
    pub ap50: f64,
    /// AP @.75.
    #[serde(rename = "AP75")]
    pub ap75: f64,
    /// AR @100 detections.
    #[serde(rename = "AR100")]
    pub ar100: f64,
}

impl Headline {
    /// The values in [`COMPARED`] order.
    pub fn values(&self) -> [f64; 4] {
        [self.ap, self.ap50, self.ap75, self.ar100]
    }

    /// From pycocotools' 12 stats.
    pub fn from_stats(s: &[f64; 12]) -> Headline {
        Headline { ap: s[0], ap50: s[1], ap75: s[2], ar100: s[8] }
    }
}

/// How close the two sides are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// |difference| < 0.001.
    Excellent,
    /// |difference| < 0.01.
    Good,
    /// |difference| >= 0.01.
    Warning,
}

impl Verdict {
    /// The verdict for one absolute difference.
    pub fn of(diff: f64) -> Verdict {
        let d = diff.abs();
        if d < 0.001 {
            Verdict::Excellent
        } else if d < 0.01 {
            Verdict::Good
        } else {
            Verdict::Warning
        }
    }
}

/// Whether both evaluations used the same data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetCheck {
    /// blake3 of the dataset each side evaluated (index + images), when known.
    pub onnx_dataset_hash: String,
    /// The PyTorch side's dataset hash (None when the user's evaluation does not say).
    pub pytorch_dataset_hash: Option<String>,
    /// Images evaluated by each side.
    pub onnx_images: usize,
    /// Images the PyTorch side evaluated, when known.
    pub pytorch_images: Option<usize>,
    /// Whether the two ground-truth files are the same (None when the PyTorch side has none).
    pub same_ground_truth: Option<bool>,
    /// All known facts agree.
    pub consistent: bool,
}

/// One compared metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricComparison {
    /// Metric name.
    pub metric: String,
    /// PyTorch value.
    pub pytorch: f64,
    /// ONNX value.
    pub onnx: f64,
    /// onnx - pytorch.
    pub difference: f64,
    /// Verdict of |difference|.
    pub verdict: Verdict,
}

/// `comparison.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Whether a PyTorch evaluation was available.
    pub available: bool,
    /// Where the PyTorch metrics came from (the user's eval dir or mkonnx's libtorch run).
    pub pytorch_source: Option<String>,
    /// The ONNX side.
    pub onnx: Headline,
    /// The PyTorch side.
    pub pytorch: Option<Headline>,
    /// Per-metric comparison (empty when not available).
    pub metrics: Vec<MetricComparison>,
    /// The worst verdict, or None when not available.
    pub overall: Option<Verdict>,
    /// Dataset consistency.
    pub dataset: DatasetCheck,
    /// Human-readable note (e.g. "Comparison not available: ...").
    pub note: String,
}

impl Comparison {
    /// Compares the two sides.
    pub fn new(onnx: Headline, pytorch: Option<(Headline, String)>, dataset: DatasetCheck) -> Comparison {
        match pytorch {
            None => Comparison {
                available: false,
                pytorch_source: None,
                onnx,
                pytorch: None,
                metrics: vec![],
                overall: None,
                dataset,
                note: "Comparison not available: no PyTorch evaluation could be had".into(),
            },
            Some((pt, source)) => {
                let metrics: Vec<MetricComparison> = COMPARED
                    .iter()
                    .zip(pt.values().iter().zip(onnx.values()))
                    .map(|(name, (&p, o))| MetricComparison {
                        metric: name.to_string(),
                        pytorch: p,
                        onnx: o,
                        difference: o - p,
                        verdict: Verdict::of(o - p),
                    })
                    .collect();
                let overall = metrics.iter().map(|m| m.verdict).max_by_key(|v| *v as u8);
                let note = if dataset.consistent { String::new() } else { "the two evaluations did not use the same dataset".into() };
                Comparison { available: true, pytorch_source: Some(source), onnx, pytorch: Some(pt), metrics, overall, dataset, note }
            }
        }
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        if !self.available {
            return format!("{}\n", self.note);
        }
        let mut s = format!("{:<8} {:>9} {:>9} {:>10}  verdict\n", "metric", "pytorch", "onnx", "diff");
        for m in &self.metrics {
            s += &format!("{:<8} {:>9.4} {:>9.4} {:>+10.5}  {:?}\n", m.metric, m.pytorch, m.onnx, m.difference, m.verdict);
        }
        if let Some(o) = self.overall {
            s += &format!("overall: {o:?}{}\n", if self.dataset.consistent { "" } else { " (dataset mismatch!)" });
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_bounds() {
        assert_eq!(Verdict::of(0.0009), Verdict::Excellent);
        assert_eq!(Verdict::of(-0.001), Verdict::Good);
        assert_eq!(Verdict::of(0.0099), Verdict::Good);
        assert_eq!(Verdict::of(0.01), Verdict::Warning);
    }

    #[test]
    fn overall_is_the_worst() {
        let h = Headline { ap: 0.5, ap50: 0.8, ap75: 0.4, ar100: 0.6 };
        let p = Headline { ap: 0.5, ap50: 0.805, ap75: 0.4, ar100: 0.6 };
        let d = DatasetCheck {
            onnx_dataset_hash: "x".into(),
            pytorch_dataset_hash: None,
            onnx_images: 1,
            pytorch_images: None,
            same_ground_truth: None,
            consistent: true,
        };
        let c = Comparison::new(h, Some((p, "mkonnx".into())), d.clone());
        assert_eq!(c.overall, Some(Verdict::Good));
        assert!(c.table().contains("AP50"));
        let c = Comparison::new(h, None, d);
        assert!(c.table().starts_with("Comparison not available"));
    }
}
