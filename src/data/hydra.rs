//! The training run's Hydra config (`.hydra/config.yaml`), reduced to what conversion needs.
//!
//! Users name the architecture in several styles; all are read:
//! `model.name`, `model.arch`, `model.architecture`, `model._target_` (a dotted path to the
//! torchvision constructor), or the same keys at the top level. torchvision keyword overrides
//! are read from the same section (and from a `kwargs` sub-section when there is one). Class
//! names come from `dataset.class_names`, `model.class_names`, `data.class_names` or a
//! top-level `class_names`.

use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// Errors reading a Hydra config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read Hydra config {path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("Hydra config {path} is not valid YAML: {message}")]
    Yaml {
        /// The config file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong type.
    #[error("Hydra config {path}: `{key}` should be {expected}, found {found}")]
    BadValue {
        /// The config file.
        path: PathBuf,
        /// Dotted key.
        key: String,
        /// What was expected.
        expected: &'static str,
        /// What was found, as YAML.
        found: String,
    },
}

/// What the config says about the model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainingConfig {
    /// The config file.
    pub path: PathBuf,
    /// The architecture as written, with the dotted key it came from (`model.name`, ...).
    pub architecture: Option<(String, String)>,
    /// torchvision keyword overrides found next to it: (dotted key, value).
    pub model_kwargs: Vec<(String, Value)>,
    /// Class names, with the key they came from.
    pub class_names: Option<(String, Vec<String>)>,
}

const ARCH_KEYS: [&str; 4] = ["name", "arch", "architecture", "_target_"];
const MODEL_SECTIONS: [&str; 3] = ["model", "detector", "network"];
const CLASS_NAME_SECTIONS: [&str; 4] = ["dataset", "model", "data", ""];

impl TrainingConfig {
    /// Reads and interprets `path`.
    pub fn load(path: &Path) -> Result<TrainingConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Interprets YAML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<TrainingConfig, ConfigError> {
        let root: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml { path: path.into(), message: e.to_string() })?;
        let mut cfg = TrainingConfig { path: path.into(), ..Default::default() };

        // The model section: the first of model/detector/network that is a mapping, else the root.
        let (section_name, section) = MODEL_SECTIONS
            .iter()
            .find_map(|s| root.get(*s).filter(|v| v.is_mapping()).map(|v| (s.to_string(), v)))
            .unwrap_or_else(|| (String::new(), &root));
        let dotted = |k: &str| if section_name.is_empty() { k.to_string() } else { format!("{section_name}.{k}") };

        for key in ARCH_KEYS {
            if let Some(v) = section.get(key) {
                let s = v.as_str().ok_or_else(|| bad(path, &dotted(key), "a string", v))?;
                if crate::model::Architecture::from_name(s).is_some() || cfg.architecture.is_none() {
                    cfg.architecture = Some((dotted(key), s.to_string()));
                }
            }
        }
        if let Value::Mapping(m) = section {
            for (k, v) in m {
                if let Some(k) = k.as_str() {
                    if !ARCH_KEYS.contains(&k) && !v.is_mapping() && !v.is_null() {
                        cfg.model_kwargs.push((dotted(k), v.clone()));
                    }
                }
            }
            if let Some(Value::Mapping(kw)) = section.get("kwargs") {
                for (k, v) in kw {
                    if let Some(k) = k.as_str() {
                        cfg.model_kwargs.push((dotted(&format!("kwargs.{k}")), v.clone()));
                    }
                }
            }
        }

        for s in CLASS_NAME_SECTIONS {
            let holder = if s.is_empty() { Some(&root) } else { root.get(s) };
            // `class_names: null` (a Hydra default left unset) means "not here".
            if let Some(v) = holder.and_then(|h| h.get("class_names")).filter(|v| !v.is_null()) {
                let key = if s.is_empty() { "class_names".to_string() } else { format!("{s}.class_names") };
                let names = v
                    .as_sequence()
                    .and_then(|seq| seq.iter().map(|n| n.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| bad(path, &key, "a list of strings", v))?;
                cfg.class_names = Some((key, names));
                break;
            }
        }
        Ok(cfg)
    }

    /// The override for torchvision keyword `name` (its last path component), if any.
    pub fn kwarg(&self, name: &str) -> Option<(&str, &Value)> {
        self.model_kwargs.iter().rev().find(|(k, _)| k.rsplit('.').next() == Some(name)).map(|(k, v)| (k.as_str(), v))
    }
}

fn bad(path: &Path, key: &str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::BadValue {
        path: path.into(),
        key: key.into(),
        expected,
        found: serde_yaml::to_string(found).unwrap_or_default().trim().to_string(),
    }
}

/// Reads a kwarg as an unsigned integer (a list takes its last element, as torchvision's
/// `min_size` does at inference).
pub fn as_uint(path: &Path, key: &str, v: &Value) -> Result<u64, ConfigError> {
    let v = match v.as_sequence() {
        Some(seq) if !seq.is_empty() => &seq[seq.len() - 1],
        _ => v,
    };
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
        .ok_or_else(|| bad(path, key, "a non-negative integer", v))
}

/// Reads a kwarg as a float.
pub fn as_float(path: &Path, key: &str, v: &Value) -> Result<f64, ConfigError> {
    v.as_f64().ok_or_else(|| bad(path, key, "a number", v))
}

/// Reads a kwarg as three floats (image_mean, image_std).
pub fn as_float3(path: &Path, key: &str, v: &Value) -> Result<[f32; 3], ConfigError> {
    let err = || bad(path, key, "a list of three numbers", v);
    let seq = v.as_sequence().ok_or_else(err)?;
    if seq.len() != 3 {
        return Err(err());
    }
    let mut out = [0f32; 3];
    for (o, x) in out.iter_mut().zip(seq) {
        *o = x.as_f64().ok_or_else(err)? as f32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> TrainingConfig {
        TrainingConfig::parse(s, Path::new("c.yaml")).unwrap()
    }

    #[test]
    fn reads_each_naming_style() {
        assert_eq!(parse("model:\n  name: fasterrcnn_resnet50_fpn\n").architecture.unwrap().1, "fasterrcnn_resnet50_fpn");
        let c = parse("model:\n  _target_: torchvision.models.detection.fasterrcnn_resnet50_fpn_v2\n  num_classes: 4\n");
        assert_eq!(c.architecture.as_ref().unwrap().0, "model._target_");
        assert_eq!(c.kwarg("num_classes").unwrap().1.as_u64(), Some(4));
        let c = parse("arch: fasterrcnn_mobilenet_v3_large_fpn\nclass_names: [a, b]\n");
        assert_eq!(c.architecture.as_ref().unwrap().0, "arch");
        assert_eq!(c.class_names.unwrap().1, vec!["a", "b"]);
    }

    #[test]
    fn kwargs_subsection_and_class_names() {
        let c =
            parse("model:\n  arch: fasterrcnn_resnet50_fpn\n  kwargs:\n    min_size: [480, 512]\ndataset:\n  class_names: [up, down]\n");
        let (k, v) = c.kwarg("min_size").unwrap();
        assert_eq!(k, "model.kwargs.min_size");
        assert_eq!(as_uint(Path::new("c"), k, v).unwrap(), 512);
        assert_eq!(c.class_names.unwrap().0, "dataset.class_names");
    }

    #[test]
    fn null_class_names_are_absent() {
        let c = parse("dataset:\n  class_names: null\nmodel:\n  arch: fasterrcnn_resnet50_fpn\n  class_names: [a]\n");
        assert_eq!(c.class_names.unwrap(), ("model.class_names".to_string(), vec!["a".to_string()]));
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = TrainingConfig::parse("model: {name: 3}", Path::new("x/config.yaml")).unwrap_err().to_string();
        assert!(e.contains("x/config.yaml") && e.contains("model.name"), "{e}");
        let e = TrainingConfig::parse("model: [", Path::new("x/config.yaml")).unwrap_err().to_string();
        assert!(e.contains("not valid YAML") && e.contains("line"), "{e}");
    }
}
