//! Which detector a run trained: architecture and hyperparameters from the Hydra config,
//! completed and checked against the checkpoint's weights (docs/DESIGN.md section 1).

use super::arch::{Architecture, DetectorParams, COUNT_RANGE, MEAN_RANGE, SIZE_RANGE, STD_RANGE, THRESHOLD_RANGE};
use super::weights::Weights;
use crate::data::hydra::{as_float3, as_number, as_uint, ConfigError, TrainingConfig};
use std::path::{Path, PathBuf};

/// Errors resolving the detector.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The config names something that is not one of the four constructors.
    #[error("{config}: `{key}: {value}` is not a supported architecture (supported: fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn)")]
    UnknownArchitecture {
        /// Config file.
        config: PathBuf,
        /// Dotted key.
        key: String,
        /// Its value.
        value: String,
    },
    /// The weights are not a torchvision FasterRCNN state dict.
    #[error("{checkpoint}: not a torchvision FasterRCNN state dict ({reason})")]
    NotFasterRcnn {
        /// Checkpoint file.
        checkpoint: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// Config and weights disagree.
    #[error("{config} says `{key}: {config_value}`, but the weights in {checkpoint} are {weights_value}")]
    Contradiction {
        /// Config file.
        config: PathBuf,
        /// Dotted key in the config.
        key: String,
        /// What the config says.
        config_value: String,
        /// Checkpoint file.
        checkpoint: PathBuf,
        /// What the weights say.
        weights_value: String,
    },
    /// A keyword mkonnx cannot honour.
    #[error("{config}: `{key}` is not supported by mkonnx ({why})")]
    Unsupported {
        /// Config file.
        config: PathBuf,
        /// Dotted key.
        key: String,
        /// Why.
        why: &'static str,
    },
    /// A malformed value.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The resolved detector description (without weights).
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// torchvision constructor.
    pub arch: Architecture,
    /// Where the architecture came from, for the summary ("config model.name", "weights").
    pub arch_source: String,
    /// Inference hyperparameters.
    pub params: DetectorParams,
    /// Class names indexed by label (index 0 is background), when the config has them.
    pub class_names: Option<Vec<String>>,
}

/// Resolves architecture and hyperparameters from `config` and `weights`.
pub fn resolve(config: &TrainingConfig, weights: &Weights, checkpoint: &Path) -> Result<Resolved, ResolveError> {
    let family = weights_family(weights, checkpoint)?;
    let num_classes = weights
        .get("roi_heads.box_predictor.cls_score.weight")
        .map_err(|_| ResolveError::NotFasterRcnn {
            checkpoint: checkpoint.into(),
            reason: "no roi_heads.box_predictor.cls_score.weight".into(),
        })?
        .shape[0];

    let (arch, arch_source) = match config_architecture(config) {
        Some((key, value)) => {
            let arch = Architecture::from_name(value).ok_or_else(|| ResolveError::UnknownArchitecture {
                config: config.path.clone(),
                key: key.clone(),
                value: value.clone(),
            })?;
            if family_of(arch) != family {
                return Err(ResolveError::Contradiction {
                    config: config.path.clone(),
                    key: key.clone(),
                    config_value: value.clone(),
                    checkpoint: checkpoint.into(),
                    weights_value: family.describe().into(),
                });
            }
            (arch, format!("config `{key}`"))
        }
        None => {
            let arch = match family {
                Family::ResNet50 => Architecture::ResNet50Fpn,
                Family::ResNet50V2 => Architecture::ResNet50FpnV2,
                // The two MobileNet constructors have the same weights; the 320 variant is
                // recognised by its input size.
                Family::MobileNetV3 => match config.kwarg("min_size") {
                    Some((k, v)) if as_uint(&config.path, k, v, SIZE_RANGE)? <= 320 => Architecture::MobileNetV3Large320Fpn,
                    _ => Architecture::MobileNetV3LargeFpn,
                },
            };
            (arch, "checkpoint weights (no architecture in the config)".to_string())
        }
    };

    let mut p = arch.defaults(num_classes);
    for (key, v) in &config.model_kwargs {
        let name = key.rsplit('.').next().unwrap_or(key);
        let path = &config.path;
        match name {
            "num_classes" => {
                let n = as_uint(path, key, v, COUNT_RANGE)? as usize;
                if n != num_classes {
                    return Err(ResolveError::Contradiction {
                        config: path.clone(),
                        key: key.clone(),
                        config_value: n.to_string(),
                        checkpoint: checkpoint.into(),
                        weights_value: format!(
                            "trained for {num_classes} classes (roi_heads.box_predictor.cls_score.weight has {num_classes} rows)"
                        ),
                    });
                }
            }
            // The casts are exact: each range is far inside u32.
            "min_size" => p.min_size = as_uint(path, key, v, SIZE_RANGE)? as u32,
            "max_size" => p.max_size = as_uint(path, key, v, SIZE_RANGE)? as u32,
            "image_mean" => p.image_mean = as_float3(path, key, v, MEAN_RANGE)?,
            "image_std" => p.image_std = as_float3(path, key, v, STD_RANGE)?,
            "rpn_pre_nms_top_n_test" => p.rpn_pre_nms_top_n_test = as_uint(path, key, v, COUNT_RANGE)? as usize,
            "rpn_post_nms_top_n_test" => p.rpn_post_nms_top_n_test = as_uint(path, key, v, COUNT_RANGE)? as usize,
            "rpn_nms_thresh" => p.rpn_nms_thresh = as_number(path, key, v, THRESHOLD_RANGE)? as f32,
            "rpn_score_thresh" => p.rpn_score_thresh = as_number(path, key, v, THRESHOLD_RANGE)? as f32,
            "box_score_thresh" => p.box_score_thresh = as_number(path, key, v, THRESHOLD_RANGE)? as f32,
            "box_nms_thresh" => p.box_nms_thresh = as_number(path, key, v, THRESHOLD_RANGE)? as f32,
            "box_detections_per_img" => p.box_detections_per_img = as_uint(path, key, v, COUNT_RANGE)? as usize,
            "fixed_size" if !v.is_null() => {
                return Err(ResolveError::Unsupported {
                    config: path.clone(),
                    key: key.clone(),
                    why: "fixed-size resizing is not implemented",
                })
            }
            _ => {} // training-only keywords and unrelated settings
        }
    }

    let class_names = config.class_names.as_ref().map(|(_, names)| label_names(names, num_classes));
    Ok(Resolved { arch, arch_source, params: p, class_names })
}

/// Class names indexed by label: a list of foreground names gets a background entry in front;
/// a list that already starts with a background entry is kept as it is.
pub fn label_names(names: &[String], num_classes: usize) -> Vec<String> {
    let mut out: Vec<String> = std::iter::once("__background__".to_string()).chain(foreground_names(names).iter().cloned()).collect();
    // Labels without a name (more classes than names) are named by number.
    for label in out.len()..num_classes {
        out.push(format!("class_{label}"));
    }
    out
}

/// The foreground names of a class-name list: a leading background entry
/// (`__background__`, `background`, `bg`, empty) is dropped.
pub fn foreground_names(names: &[String]) -> &[String] {
    match names.first() {
        Some(n) if n.is_empty() || n.to_lowercase().trim_matches('_') == "background" || n.to_lowercase().trim_matches('_') == "bg" => {
            &names[1..]
        }
        _ => names,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    ResNet50,
    ResNet50V2,
    MobileNetV3,
}

impl Family {
    fn describe(self) -> &'static str {
        match self {
            Family::ResNet50 => "a ResNet-50 FPN FasterRCNN (fasterrcnn_resnet50_fpn)",
            Family::ResNet50V2 => "a ResNet-50 FPN v2 FasterRCNN (fasterrcnn_resnet50_fpn_v2)",
            Family::MobileNetV3 => "a MobileNetV3-Large FPN FasterRCNN (fasterrcnn_mobilenet_v3_large_fpn or _320_fpn)",
        }
    }
}

/// Which of the config's architecture keys names the architecture: the last one whose value
/// is a torchvision constructor (a `_target_` path and a plain `name` may both be there), else
/// the first (whose unknown value is then reported).
fn config_architecture(config: &TrainingConfig) -> Option<&(String, String)> {
    let keys = &config.architecture_keys;
    keys.iter().rev().find(|(_, value)| Architecture::from_name(value).is_some()).or(keys.first())
}

fn family_of(arch: Architecture) -> Family {
    match arch {
        Architecture::ResNet50Fpn => Family::ResNet50,
        Architecture::ResNet50FpnV2 => Family::ResNet50V2,
        Architecture::MobileNetV3LargeFpn | Architecture::MobileNetV3Large320Fpn => Family::MobileNetV3,
    }
}

fn weights_family(w: &Weights, checkpoint: &Path) -> Result<Family, ResolveError> {
    if w.contains("backbone.body.layer1.0.conv1.weight") {
        Ok(if w.contains("roi_heads.box_head.0.0.weight") { Family::ResNet50V2 } else { Family::ResNet50 })
    } else if w.contains("backbone.body.0.0.weight") && w.contains("backbone.body.1.block.0.0.weight") {
        Ok(Family::MobileNetV3)
    } else {
        let sample: Vec<&str> = {
            let mut n: Vec<&str> = w.names().collect();
            n.sort();
            n.into_iter().take(5).collect()
        };
        Err(ResolveError::NotFasterRcnn {
            checkpoint: checkpoint.into(),
            reason: format!("no ResNet-50 or MobileNetV3 backbone.body tensors; first keys: {sample:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WeightTensor;

    fn weights(keys: &[&str], classes: usize) -> Weights {
        let mut v: Vec<(String, WeightTensor)> =
            keys.iter().map(|k| (k.to_string(), WeightTensor { shape: vec![1], data: vec![0.0] })).collect();
        v.push(("roi_heads.box_predictor.cls_score.weight".into(), WeightTensor { shape: vec![classes, 2], data: vec![0.0; classes * 2] }));
        Weights::new(v)
    }

    fn cfg(s: &str) -> TrainingConfig {
        TrainingConfig::parse(s, Path::new("run/.hydra/config.yaml")).unwrap()
    }

    #[test]
    fn infers_what_the_config_leaves_out() {
        let w = weights(&["backbone.body.0.0.weight", "backbone.body.1.block.0.0.weight"], 5);
        let r = resolve(&cfg("model:\n  min_size: 320\n"), &w, Path::new("ckpt.pth")).unwrap();
        assert_eq!(r.arch, Architecture::MobileNetV3Large320Fpn);
        assert_eq!(r.params.num_classes, 5);
        let r = resolve(&cfg("seed: 1\n"), &w, Path::new("ckpt.pth")).unwrap();
        assert_eq!(r.arch, Architecture::MobileNetV3LargeFpn);
        assert_eq!(r.params.min_size, 800);
    }

    #[test]
    fn contradictions_name_both_files() {
        let w = weights(&["backbone.body.layer1.0.conv1.weight"], 3);
        let e = resolve(&cfg("model:\n  name: fasterrcnn_mobilenet_v3_large_fpn\n"), &w, Path::new("ckpt.pth")).unwrap_err().to_string();
        assert!(e.contains("config.yaml") && e.contains("ckpt.pth") && e.contains("ResNet-50"), "{e}");
        let e = resolve(&cfg("model:\n  name: fasterrcnn_resnet50_fpn\n  num_classes: 4\n"), &w, Path::new("ckpt.pth"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_classes: 4") && e.contains("3 classes"), "{e}");
    }

    #[test]
    fn overrides_apply() {
        let w = weights(&["backbone.body.layer1.0.conv1.weight", "roi_heads.box_head.0.0.weight"], 3);
        let r = resolve(&cfg("model:\n  _target_: torchvision.models.detection.fasterrcnn_resnet50_fpn_v2\n  min_size: 256\n  box_score_thresh: 0.3\ndataset:\n  class_names: [a, b]\n"), &w, Path::new("c.pth")).unwrap();
        assert_eq!((r.params.min_size, r.params.box_score_thresh), (256, 0.3));
        assert_eq!(r.class_names.unwrap(), vec!["__background__", "a", "b"]);
    }
}
