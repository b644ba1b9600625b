//! The training run's Hydra config (`.hydra/config.yaml`), reduced to what conversion needs.
//!
//! Users name the architecture in several styles; all are read:
//! `model.name`, `model.arch`, `model.architecture`, `model._target_` (a dotted path to the
//! torchvision constructor), or the same keys at the top level. torchvision keyword overrides
//! are read from the same section (and from a `kwargs` sub-section when there is one). Class
//! names come from `dataset.class_names`, `model.class_names`, `data.class_names` or a
//! top-level `class_names`.

use super::range::Range;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// The deepest nesting of collections a config may have. Hydra configs are a few levels deep;
/// the limit is far above that and far below where the YAML parser gets slow (its time grows
/// with the square of the nesting: 200 KB of nested flow collections took 53 s).
pub const MAX_YAML_DEPTH: usize = 64;

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
    /// The file holds no YAML document, or only comments.
    #[error("Hydra config {0} is empty: Hydra always writes the run's whole config there, so the file was truncated or replaced (a config may leave keys out, but not be blank)")]
    Empty(PathBuf),
    /// Collections nest deeper than [`MAX_YAML_DEPTH`].
    #[error("Hydra config {path}: collections nest deeper than {limit} levels at line {line} (Hydra configs are a few levels deep; deeper YAML takes the parser quadratic time)")]
    TooDeep {
        /// The config file.
        path: PathBuf,
        /// 1-based line where the limit is passed.
        line: usize,
        /// The limit.
        limit: usize,
    },
    /// A key has a value of the wrong type, or a number out of its range.
    #[error("Hydra config {path}: `{key}` should be {expected}, found {found}")]
    BadValue {
        /// The config file.
        path: PathBuf,
        /// Dotted key.
        key: String,
        /// What was expected, with the allowed range for numbers.
        expected: String,
        /// What was found, as YAML.
        found: String,
    },
}

/// What the config says about the model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainingConfig {
    /// The config file.
    pub path: PathBuf,
    /// Every architecture-like key of the model section (`name`, `arch`, ...) with its value
    /// as written, in the order of the keys mkonnx looks for. Which one names the
    /// architecture is `model::resolve`'s decision (the data layer knows no architectures).
    pub architecture_keys: Vec<(String, String)>,
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
        if let Some(line) = line_past_depth(text, MAX_YAML_DEPTH) {
            return Err(ConfigError::TooDeep { path: path.into(), line, limit: MAX_YAML_DEPTH });
        }
        let root: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml { path: path.into(), message: e.to_string() })?;
        match &root {
            // Without this an empty config would silently convert the weights' default
            // architecture at its default size (the 800 px MobileNet for a 320 px run).
            Value::Null => return Err(ConfigError::Empty(path.into())),
            Value::Mapping(_) => {}
            other => return Err(bad(path, "(top level)", "a mapping of config keys", other)),
        }
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
                cfg.architecture_keys.push((dotted(key), s.to_string()));
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

fn bad(path: &Path, key: &str, expected: impl Into<String>, found: &Value) -> ConfigError {
    ConfigError::BadValue {
        path: path.into(),
        key: key.into(),
        expected: expected.into(),
        found: serde_yaml::to_string(found).unwrap_or_default().trim().to_string(),
    }
}

/// Reads a number in `range`: the one check every number from a config goes through, so a
/// NaN, an infinity, a float where a count belongs or an out-of-range value is an error
/// naming the file, the key and the range.
pub fn as_number(path: &Path, key: &str, v: &Value, range: Range) -> Result<f64, ConfigError> {
    v.as_f64().filter(|&x| range.contains(x)).ok_or_else(|| bad(path, key, range.to_string(), v))
}

/// Reads an integer kwarg in `range` (an integer-valued float such as `320.0` is one). A list
/// takes its last element, as torchvision's `min_size` does at inference; every element is
/// checked, since training used them all.
pub fn as_uint(path: &Path, key: &str, v: &Value, range: Range) -> Result<u64, ConfigError> {
    let last = match v.as_sequence() {
        Some(seq) if !seq.is_empty() => {
            for (i, x) in seq.iter().enumerate() {
                as_number(path, &format!("{key}[{i}]"), x, range)?;
            }
            &seq[seq.len() - 1]
        }
        _ => v,
    };
    // In range, so integral, non-negative and below 2^53: the cast is exact.
    Ok(as_number(path, key, last, range)? as u64)
}

/// Reads three floats in `range` (image_mean, image_std).
pub fn as_float3(path: &Path, key: &str, v: &Value, range: Range) -> Result<[f32; 3], ConfigError> {
    let seq =
        v.as_sequence().filter(|s| s.len() == 3).ok_or_else(|| bad(path, key, format!("a list of three numbers, each {range}"), v))?;
    let mut out = [0f32; 3];
    for (i, (o, x)) in out.iter_mut().zip(seq).enumerate() {
        *o = as_number(path, &format!("{key}[{i}]"), x, range)? as f32;
    }
    Ok(out)
}

/// The 1-based line at which collections in `text` nest deeper than `limit`, if they do.
///
/// A cheap scan run before the YAML parser, whose time grows with the square of the nesting.
/// It counts block levels by indentation (and by `- `/`? ` indicators, which open a level
/// on the same line) plus flow levels by `[`/`{`, skipping comments, quoted scalars and the
/// lines of `|`/`>` block scalars. It may count a level or two differently from the parser
/// (a sequence indented like its parent key counts as a sibling), which does not matter for
/// a bound this far from real configs and from the parser's slow region.
fn line_past_depth(text: &str, limit: usize) -> Option<usize> {
    let mut block: Vec<usize> = Vec::new(); // columns of the open block nodes
    let mut flow = 0usize; // open `[` / `{`, which span lines
    let mut quote: Option<u8> = None; // inside a quoted scalar, which may span lines
    let mut block_scalar: Option<usize> = None; // skipping the lines indented deeper than this
    for (n, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let rest = line[indent..].trim_end();
        if let Some(parent) = block_scalar {
            if rest.is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let mut i = 0;
        if quote.is_none() && flow == 0 {
            if rest.is_empty() || rest.starts_with('#') || rest.starts_with('%') {
                continue;
            }
            i = indent;
            if rest.starts_with("---") || rest.starts_with("...") {
                block.clear(); // a new document
                i += 3;
                while i < b.len() && b[i] == b' ' {
                    i += 1;
                }
            }
            // Open a block level at each node start: the indentation, then after each `- `.
            loop {
                while block.last().is_some_and(|&c| c > i) {
                    block.pop();
                }
                if block.last() != Some(&i) {
                    block.push(i);
                }
                if block.len() > limit {
                    return Some(n + 1);
                }
                let indicator = i < b.len() && (b[i] == b'-' || b[i] == b'?') && b.get(i + 1).is_none_or(|&c| c == b' ');
                if !indicator {
                    break;
                }
                i += 1;
                while i < b.len() && b[i] == b' ' {
                    i += 1;
                }
                if i >= b.len() {
                    break;
                }
            }
        }
        // The rest of the line, character by character.
        let mut node_start = quote.is_none();
        while i < b.len() {
            let c = b[i];
            if let Some(q) = quote {
                if q == b'"' && c == b'\\' {
                    i += 1; // skip the escaped character
                } else if c == q && q == b'\'' && b.get(i + 1) == Some(&b'\'') {
                    i += 1; // '' inside a single-quoted scalar
                } else if c == q {
                    quote = None;
                }
                i += 1;
                continue;
            }
            match c {
                b'#' if i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t' => break,
                b'"' | b'\'' if node_start => quote = Some(c),
                // In block context `[` starts a collection only where a node starts (`a[0]`
                // is a plain scalar); in flow context plain scalars cannot contain it.
                b'[' | b'{' if node_start || flow > 0 => {
                    flow += 1;
                    if block.len() + flow > limit {
                        return Some(n + 1);
                    }
                    node_start = true;
                }
                b']' | b'}' if flow > 0 => {
                    flow -= 1;
                    node_start = false;
                }
                b',' if flow > 0 => node_start = true,
                b':' if flow > 0 || b.get(i + 1).is_none_or(|&c| c == b' ') => {
                    node_start = true;
                    if flow == 0 {
                        let value = line[i + 1..].trim_start();
                        if value.starts_with('|') || value.starts_with('>') {
                            block_scalar = Some(indent);
                            break;
                        }
                    }
                }
                b'|' | b'>' if node_start && flow == 0 => {
                    block_scalar = Some(indent); // `- |`
                    break;
                }
                b' ' | b'\t' => {}
                _ => node_start = false,
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> TrainingConfig {
        TrainingConfig::parse(s, Path::new("c.yaml")).unwrap()
    }

    #[test]
    fn reads_each_naming_style() {
        assert_eq!(parse("model:\n  name: fasterrcnn_resnet50_fpn\n").architecture_keys[0].1, "fasterrcnn_resnet50_fpn");
        let c = parse("model:\n  _target_: torchvision.models.detection.fasterrcnn_resnet50_fpn_v2\n  num_classes: 4\n");
        assert_eq!(c.architecture_keys[0].0, "model._target_");
        assert_eq!(c.kwarg("num_classes").unwrap().1.as_u64(), Some(4));
        let c = parse("arch: fasterrcnn_mobilenet_v3_large_fpn\nclass_names: [a, b]\n");
        assert_eq!(c.architecture_keys[0].0, "arch");
        assert_eq!(c.class_names.unwrap().1, vec!["a", "b"]);
    }

    #[test]
    fn kwargs_subsection_and_class_names() {
        let c =
            parse("model:\n  arch: fasterrcnn_resnet50_fpn\n  kwargs:\n    min_size: [480, 512]\ndataset:\n  class_names: [up, down]\n");
        let (k, v) = c.kwarg("min_size").unwrap();
        assert_eq!(k, "model.kwargs.min_size");
        assert_eq!(as_uint(Path::new("c"), k, v, Range::integer(1, 1000)).unwrap(), 512);
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

    #[test]
    fn empty_and_non_mapping_configs_are_errors_naming_the_file() {
        for text in ["", "\n\n", "# only a comment\n", "---\n"] {
            let e = TrainingConfig::parse(text, Path::new("run/.hydra/config.yaml")).unwrap_err().to_string();
            assert!(e.contains("run/.hydra/config.yaml") && e.contains("is empty"), "{text:?}: {e}");
        }
        let e = TrainingConfig::parse("[1, 2]\n", Path::new("c.yaml")).unwrap_err().to_string();
        assert!(e.contains("c.yaml") && e.contains("a mapping"), "{e}");
        // Leaving keys out is fine: they are inferred from the weights.
        assert!(parse("seed: 1\n").architecture_keys.is_empty());
    }

    #[test]
    fn numbers_are_checked_against_their_range() {
        let p = Path::new("c.yaml");
        let sizes = Range::integer(1, 10_000);
        let unit = Range::closed(0.0, 1.0);
        let value = |s: &str| serde_yaml::from_str::<Value>(s).unwrap();
        assert_eq!(as_uint(p, "model.min_size", &value("320.0"), sizes).unwrap(), 320);
        for bad in ["4294967616", "0", "-1", "320.5", ".nan", ".inf", "'320'", "true", "[320, 0]", "null"] {
            let e = as_uint(p, "model.min_size", &value(bad), sizes).unwrap_err().to_string();
            assert!(e.contains("c.yaml") && e.contains("model.min_size") && e.contains("an integer in [1, 10000]"), "{bad}: {e}");
        }
        let e = as_uint(p, "model.min_size", &value("[320, 0, 480]"), sizes).unwrap_err().to_string();
        assert!(e.contains("`model.min_size[1]`") && e.contains("found 0"), "{e}");
        assert_eq!(as_number(p, "k", &value("1"), unit).unwrap(), 1.0);
        for bad in [".nan", "-.inf", "-1", "2", "1.0000001"] {
            let e = as_number(p, "model.kwargs.box_nms_thresh", &value(bad), unit).unwrap_err().to_string();
            assert!(e.contains("`model.kwargs.box_nms_thresh` should be a number in [0, 1]"), "{bad}: {e}");
        }
        let e = as_float3(p, "model.image_std", &value("[0.2, 0, 0.2]"), Range::positive(1e6)).unwrap_err().to_string();
        assert!(e.contains("`model.image_std[1]` should be a number in (0, 1000000], found 0"), "{e}");
        let e = as_float3(p, "model.image_std", &value("[1, 2]"), Range::positive(1e6)).unwrap_err().to_string();
        assert!(e.contains("a list of three numbers, each a number in (0, 1000000]"), "{e}");
    }

    #[test]
    fn nesting_depth_is_bounded_before_parsing() {
        let deep_flow = format!("model: {}{}\n", "[".repeat(100), "]".repeat(100));
        let e = TrainingConfig::parse(&deep_flow, Path::new("x/config.yaml")).unwrap_err().to_string();
        assert!(e.contains("x/config.yaml") && e.contains("deeper than 64 levels") && e.contains("line 1"), "{e}");
        let mut deep_block = String::new();
        for d in 0..80 {
            deep_block += &format!("{}k{d}:\n", " ".repeat(d));
        }
        let e = TrainingConfig::parse(&deep_block, Path::new("c.yaml")).unwrap_err().to_string();
        assert!(e.contains("deeper than 64 levels at line 65"), "{e}");
        let dashes = format!("{}x\n", "- ".repeat(80));
        assert_eq!(line_past_depth(&dashes, 64), Some(1));
        // Flow collections spanning lines, inside block ones.
        let spanning = format!("a:\n  b: {}\n{}\n", "{x: [".repeat(20), "]}".repeat(20));
        assert_eq!(line_past_depth(&spanning, 64), None);
        assert_eq!(line_past_depth(&spanning, 40), Some(2));

        // What is not a collection is not counted: brackets in plain and quoted scalars,
        // comments and block scalars.
        let many = "[".repeat(100);
        for text in [
            format!("a: x{many}\n"),
            format!("a: \"{many}\"\n"),
            format!("a: '{many}'\n"),
            format!("a: [\"{many}\", 'it''s {many}']\n"),
            format!("a: 1 # {many}\n"),
            format!("# {many}\n"),
            format!("a: |\n  {many}\n  {many}\nb: 2\n"),
            format!("- >-\n  {many}\n"),
            format!("a: \"multi\n  line {many}\"\n"),
        ] {
            assert_eq!(line_past_depth(&text, 64), None, "{text}");
        }
        // A real Hydra config is nowhere near the limit.
        let hydra = "model:\n  name: fasterrcnn_resnet50_fpn\n  kwargs:\n    min_size: [480, 512]\ndataset:\n  class_names: [a, b]\n  aug:\n  - {p: 0.5, ops: [flip, {crop: [1, 2]}]}\n";
        assert_eq!(line_past_depth(hydra, 7), None);
        assert_eq!(line_past_depth(hydra, 6), Some(8));
    }

    #[test]
    fn deep_nesting_is_rejected_fast() {
        // 200 KB of nested flow collections took serde_yaml 53 s.
        let text = format!("model: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let start = std::time::Instant::now();
        assert!(matches!(TrainingConfig::parse(&text, Path::new("c.yaml")), Err(ConfigError::TooDeep { line: 1, .. })));
        assert!(start.elapsed() < std::time::Duration::from_secs(1), "{:?}", start.elapsed());
    }
}
