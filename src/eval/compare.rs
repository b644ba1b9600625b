//! PyTorch vs ONNX: the four headline COCO metrics, their differences and verdicts, the
//! INT8 model's column when one was built, and each model's latency (`comparison.json` and
//! the terminal table).

use super::latency::Latency;
use serde::{Deserialize, Serialize};

/// The metrics compared, as named in `comparison.json`.
pub const COMPARED: [&str; 4] = ["AP", "AP50", "AP75", "AR100"];

/// The headline metrics of one side. In JSON, an object keyed by the names in [`COMPARED`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Headline {
    /// AP @[.50:.95].
    pub ap: f64,
    /// AP @.50.
    pub ap50: f64,
    /// AP @.75.
    pub ap75: f64,
    /// AR @100 detections.
    pub ar100: f64,
}

impl Serialize for Headline {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(COMPARED.len()))?;
        for (name, value) in COMPARED.iter().zip(self.values()) {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Headline {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = std::collections::BTreeMap::<String, serde_json::Value>::deserialize(deserializer)?;
        let metric = |name: &str| {
            map.get(name).and_then(serde_json::Value::as_f64).ok_or_else(|| serde::de::Error::custom(format!("no number `{name}`")))
        };
        let [ap, ap50, ap75, ar100] = COMPARED;
        Ok(Headline { ap: metric(ap)?, ap50: metric(ap50)?, ap75: metric(ap75)?, ar100: metric(ar100)? })
    }
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
    /// The INT8 model, when `--quantize int8` built one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8: Option<Int8Column>,
    /// Per-image latency of each model evaluated here (a measurement: it changes between
    /// builds, unlike the metrics).
    #[serde(default)]
    pub latency: LatencyColumns,
}

/// Each evaluated model's latency (see [`super::latency`]); absent where it was not measured
/// (a user's own PyTorch evaluation, no INT8 model).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyColumns {
    /// PyTorch on libtorch (mkonnx's runner).
    pub pytorch: Option<Latency>,
    /// ONNX float32 in ONNX Runtime with its default optimizations.
    pub onnx: Option<Latency>,
    /// The INT8 model in ONNX Runtime with its default optimizations.
    pub int8: Option<Latency>,
}

/// One metric of the INT8 model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Int8Metric {
    /// Metric name.
    pub metric: String,
    /// INT8 value.
    pub int8: f64,
    /// int8 - pytorch, when a PyTorch evaluation is available.
    pub difference: Option<f64>,
    /// int8 - onnx (float32): the cost of quantization alone.
    pub difference_to_float32: f64,
    /// Verdict of |difference| (of |difference_to_float32| when there is no PyTorch side),
    /// by the same tiers as the float32 model's.
    pub verdict: Verdict,
}

/// The INT8 column of `comparison.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Int8Column {
    /// The INT8 model's headline metrics.
    pub headline: Headline,
    /// Per metric, against PyTorch and against float32.
    pub metrics: Vec<Int8Metric>,
    /// The worst verdict.
    pub overall: Verdict,
    /// How it was calibrated (method, images, where they came from).
    pub calibration: String,
    /// Empty when INT8 AP is within [`INT8_AP_BUDGET`] of float32's; else what it lost and
    /// what to try.
    #[serde(default)]
    pub note: String,
}

/// How far INT8 AP may be from float32 AP before the comparison warns about it.
pub const INT8_AP_BUDGET: f64 = 0.01;

impl Int8Column {
    /// The INT8 column for `int8` against the comparison's other sides.
    pub fn new(int8: Headline, float32: &Headline, pytorch: Option<&Headline>, calibration: String) -> Int8Column {
        let metrics: Vec<Int8Metric> = COMPARED
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = int8.values()[i];
                let difference = pytorch.map(|p| v - p.values()[i]);
                let difference_to_float32 = v - float32.values()[i];
                Int8Metric {
                    metric: name.to_string(),
                    int8: v,
                    difference,
                    difference_to_float32,
                    verdict: Verdict::of(difference.unwrap_or(difference_to_float32)),
                }
            })
            .collect();
        let overall = worst(metrics.iter().map(|m| m.verdict)).unwrap_or(Verdict::Excellent);
        let lost = int8.ap - float32.ap;
        let note = if lost.abs() < INT8_AP_BUDGET {
            String::new()
        } else {
            format!(
                "INT8 AP is {lost:+.4} from float32, beyond {INT8_AP_BUDGET}: one scale per activation tensor does not fit \
                 this model that well (MobileNetV3's hard-swish and squeeze-excitation layers lose the most); try \
                 --calibration-method percentile, or more or other calibration images"
            )
        };
        Int8Column { headline: int8, metrics, overall, calibration, note }
    }
}

/// The worst of some verdicts.
fn worst(verdicts: impl Iterator<Item = Verdict>) -> Option<Verdict> {
    verdicts.max_by_key(|v| *v as u8)
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
                int8: None,
                latency: LatencyColumns::default(),
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
                let overall = worst(metrics.iter().map(|m| m.verdict));
                let note = if dataset.consistent { String::new() } else { "the two evaluations did not use the same dataset".into() };
                Comparison {
                    available: true,
                    pytorch_source: Some(source),
                    onnx,
                    pytorch: Some(pt),
                    metrics,
                    overall,
                    dataset,
                    note,
                    int8: None,
                    latency: LatencyColumns::default(),
                }
            }
        }
    }

    /// The terminal table: the metrics (with the INT8 column when there is one), the overall
    /// verdicts, each model's latency, and how the INT8 model was calibrated.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if self.available {
            s += &format!("{:<8} {:>9} {:>9} {:>10}  {:<9}", "metric", "pytorch", "onnx", "diff", "verdict");
            if self.int8.is_some() {
                s += &format!(" {:>9} {:>10}  verdict", "int8", "diff");
            }
            s = s.trim_end().to_string() + "\n";
            for (i, m) in self.metrics.iter().enumerate() {
                let mut line = format!(
                    "{:<8} {:>9.4} {:>9.4} {:>+10.5}  {:<9}",
                    m.metric,
                    m.pytorch,
                    m.onnx,
                    m.difference,
                    format!("{:?}", m.verdict)
                );
                if let Some(q) = self.int8.as_ref().and_then(|c| c.metrics.get(i)) {
                    line += &format!(" {:>9.4} {:>+10.5}  {:?}", q.int8, q.difference.unwrap_or(q.difference_to_float32), q.verdict);
                }
                s += line.trim_end();
                s += "\n";
            }
            if let Some(o) = self.overall {
                s += &format!("overall: {o:?}{}", if self.dataset.consistent { "" } else { " (dataset mismatch!)" });
                if let Some(c) = &self.int8 {
                    s += &format!("; int8: {:?}", c.overall);
                }
                s += "\n";
            }
        } else {
            s += &format!("{}\n", self.note);
            if let Some(c) = &self.int8 {
                s += &format!(
                    "int8 vs onnx float32: {}",
                    c.metrics.iter().map(|m| format!("{} {:+.5}", m.metric, m.difference_to_float32)).collect::<Vec<_>>().join(", ")
                );
                s += &format!(" ({:?})\n", c.overall);
            }
        }
        let timed: Vec<(&str, &Latency)> = [("pytorch", &self.latency.pytorch), ("onnx", &self.latency.onnx), ("int8", &self.latency.int8)]
            .into_iter()
            .filter_map(|(name, l)| l.as_ref().map(|l| (name, l)))
            .collect();
        if !timed.is_empty() {
            s += "latency per image (median, p95 after warm-up):";
            for (name, l) in &timed {
                s += &format!(" {name} {}, {} thread(s);", l.short(), l.threads);
            }
            s = s.trim_end_matches(';').to_string() + "\n";
        }
        if let Some(c) = &self.int8 {
            s += &format!("int8 calibration: {}\n", c.calibration);
            if !c.note.is_empty() {
                s += &format!("int8 note: {}\n", c.note);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_json_is_keyed_by_the_compared_names() {
        let h = Headline { ap: 0.5, ap50: 0.8, ap75: 0.4, ar100: 0.625 };
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(text, r#"{"AP":0.5,"AP50":0.8,"AP75":0.4,"AR100":0.625}"#);
        assert_eq!(serde_json::from_str::<Headline>(&text).unwrap(), h);
        // Other keys (a whole COCO metrics object) are ignored; a missing one is an error.
        let coco = r#"{"AP":0.5,"AP50":0.8,"AP75":0.4,"APs":-1.0,"AR100":0.625,"stats":[1.0]}"#;
        assert_eq!(serde_json::from_str::<Headline>(coco).unwrap(), h);
        let err = serde_json::from_str::<Headline>(r#"{"AP":0.5,"AP50":0.8,"AP75":0.4}"#).unwrap_err();
        assert!(err.to_string().contains("AR100"), "{err}");
    }

    #[test]
    fn verdict_bounds() {
        assert_eq!(Verdict::of(0.0009), Verdict::Excellent);
        assert_eq!(Verdict::of(-0.001), Verdict::Good);
        assert_eq!(Verdict::of(0.0099), Verdict::Good);
        assert_eq!(Verdict::of(0.01), Verdict::Warning);
    }

    /// A consistent dataset check of one image.
    fn one_image_check() -> DatasetCheck {
        DatasetCheck {
            onnx_dataset_hash: "x".into(),
            pytorch_dataset_hash: None,
            onnx_images: 1,
            pytorch_images: None,
            same_ground_truth: None,
            consistent: true,
        }
    }

    #[test]
    fn overall_is_the_worst() {
        let h = Headline { ap: 0.5, ap50: 0.8, ap75: 0.4, ar100: 0.6 };
        let p = Headline { ap: 0.5, ap50: 0.805, ap75: 0.4, ar100: 0.6 };
        let d = one_image_check();
        let c = Comparison::new(h, Some((p, "mkonnx".into())), d.clone());
        assert_eq!(c.overall, Some(Verdict::Good));
        assert!(c.table().contains("AP50"));
        let c = Comparison::new(h, None, d);
        assert!(c.table().starts_with("Comparison not available"));
    }

    #[test]
    fn int8_column_and_latency_in_the_table() {
        let float32 = Headline { ap: 0.5, ap50: 0.8, ap75: 0.4, ar100: 0.6 };
        let pytorch = Headline { ap: 0.5, ap50: 0.8, ap75: 0.4, ar100: 0.6 };
        let int8 = Headline { ap: 0.495, ap50: 0.8, ap75: 0.38, ar100: 0.6 };
        let d = one_image_check();
        let mut c = Comparison::new(float32, Some((pytorch, "mkonnx".into())), d);
        c.int8 = Some(Int8Column::new(int8, &float32, Some(&pytorch), "minmax on 8 images".into()));
        let latency = |ms: f64| Latency { median_ms: ms, p95_ms: ms + 1.0, images: 20, warmup_images: 3, threads: 1, measured: "t".into() };
        c.latency = LatencyColumns { pytorch: Some(latency(30.0)), onnx: Some(latency(20.0)), int8: Some(latency(10.0)) };
        let q = c.int8.as_ref().unwrap();
        assert_eq!(q.overall, Verdict::Warning); // AP75 -0.02
        assert_eq!(q.metrics[0].verdict, Verdict::Good);
        let table = c.table();
        assert!(table.contains("int8") && table.contains("-0.02000") && table.contains("int8: Warning"), "{table}");
        assert!(table.contains("pytorch 30.0 ms (p95 31.0)") && table.contains("int8 10.0 ms"), "{table}");
        assert!(table.contains("int8 calibration: minmax on 8 images"), "{table}");
        assert!(!table.contains("int8 note"), "{table}"); // AP 0.005 below float32
        let worse = Headline { ap: 0.48, ..int8 };
        let q = Int8Column::new(worse, &float32, Some(&pytorch), "c".into());
        assert!(q.note.contains("INT8 AP is -0.0200 from float32"), "{}", q.note);
        let back: Comparison = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
