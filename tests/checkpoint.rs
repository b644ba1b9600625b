//! The checkpoint reader against real `torch.save` files.
//!
//! `reference/checkpoint_cases.py` writes the files into `$MKONNX_FIXTURES/checkpoints/`
//! together with `expected.json`: for each file, what `torch.load` returns once the state
//! dict is unwrapped (keys, dtypes, shapes, values or value summaries, the other top-level
//! entries), or the kind of error the reader must report.

mod common;
use common::fixtures_dir;

use std::io::{Cursor, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mkonnx::data::checkpoint::{load_state_dict, load_state_dict_from_bytes, CheckpointError, PyValue, StateDict};
use serde_json::Value;

fn cases_dir() -> PathBuf {
    fixtures_dir().join("checkpoints")
}

fn expected_cases() -> Vec<(String, Value)> {
    let path = cases_dir().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let cases = json["cases"].as_object().unwrap_or_else(|| panic!("{} has no \"cases\" object", path.display()));
    cases.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(opt_str).collect()).unwrap_or_default()
}

/// Equal up to a few ulps of f64.
fn close(got: &[f64], want: &[f64]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g == w || (g - w).abs() <= 4.0 * f64::EPSILON * w.abs())
}

/// Compare one loaded state dict with its expected.json entry; push every mismatch.
fn check_ok(name: &str, sd: &StateDict, case: &Value, errors: &mut Vec<String>) {
    let mut err = |msg: String| errors.push(format!("{name}: {msg}"));
    if sd.wrapper != opt_str(&case["wrapper"]) {
        err(format!("wrapper {:?}, expected {}", sd.wrapper, case["wrapper"]));
    }
    if sd.stripped_prefix != opt_str(&case["stripped_prefix"]) {
        err(format!("stripped prefix {:?}, expected {}", sd.stripped_prefix, case["stripped_prefix"]));
    }
    let others: Vec<String> = sd.other_top_level_keys().into_iter().map(str::to_owned).collect();
    if others != str_list(&case["other_top_level_keys"]) {
        err(format!("other top-level keys {others:?}, expected {}", case["other_top_level_keys"]));
    }
    if sd.skipped_keys != str_list(&case["skipped_keys"]) {
        err(format!("skipped keys {:?}, expected {}", sd.skipped_keys, case["skipped_keys"]));
    }

    let expected = case["tensors"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = sd.names().collect();
    let expected_names: Vec<&str> = expected.iter().filter_map(|t| t["key"].as_str()).collect();
    if names != expected_names {
        err(format!("keys {names:?}, expected {expected_names:?}"));
    }
    for t in &expected {
        let key = t["key"].as_str().unwrap_or_default();
        let Some(tensor) = sd.get(key) else {
            err(format!("missing tensor {key}"));
            continue;
        };
        if tensor.dtype().name() != t["dtype"].as_str().unwrap_or_default() {
            err(format!("{key}: dtype {}, expected {}", tensor.dtype(), t["dtype"]));
        }
        let shape: Vec<u64> = tensor.shape().iter().map(|&d| d as u64).collect();
        let expected_shape: Vec<u64> = t["shape"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
        if shape != expected_shape {
            err(format!("{key}: shape {shape:?}, expected {expected_shape:?}"));
            continue;
        }
        let values = tensor.to_f64();
        if values.len() != tensor.numel() || tensor.data().len() != tensor.numel() * tensor.dtype().size() {
            err(format!("{key}: {} values for {} elements", values.len(), tensor.numel()));
            continue;
        }
        let floats = |v: &Value| -> Vec<f64> { v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default() };
        if t.get("values").is_some() {
            // Every dtype's values are exact in f64 (the int64 cases stay below 2^53); the
            // tolerance only absorbs serde_json's last-digit float parsing.
            let want = floats(&t["values"]);
            if !close(&values, &want) {
                err(format!("{key}: values {values:?}, expected {want:?}"));
            }
        } else {
            let first = floats(&t["first"]);
            if !close(&values[..first.len().min(values.len())], &first) {
                err(format!("{key}: first values differ: {:?} vs {first:?}", &values[..first.len().min(values.len())]));
            }
            let sum: f64 = values.iter().sum();
            let abs_sum: f64 = values.iter().map(|v| v.abs()).sum();
            let want_sum = t["sum"].as_f64().unwrap_or(f64::NAN);
            let want_abs = t["abs_sum"].as_f64().unwrap_or(f64::NAN);
            // Summation order differs from torch's; f64 rounding stays far below this.
            let tol = 1e-9 * want_abs.max(1.0);
            if (sum - want_sum).abs() > tol || (abs_sum - want_abs).abs() > tol {
                err(format!("{key}: sum {sum} / abs sum {abs_sum}, expected {want_sum} / {want_abs}"));
            }
        }
    }

    let other = |k: &str| sd.other(k);
    for (k, v) in case["scalars"].as_object().into_iter().flatten() {
        let got = other(k);
        let ok = match (got, v) {
            (Some(PyValue::Bool(b)), Value::Bool(w)) => b == w,
            (Some(PyValue::Str(s)), Value::String(w)) => s == w,
            (Some(PyValue::Int(i)), Value::Number(n)) if n.is_i64() => Some(*i) == n.as_i64(),
            (Some(PyValue::Float(f)), Value::Number(n)) if !n.is_i64() => n.as_f64().is_some_and(|w| close(&[*f], &[w])),
            _ => false,
        };
        if !ok {
            err(format!("top-level {k}: {got:?}, expected {v}"));
        }
    }
    for (k, v) in case["objects"].as_object().into_iter().flatten() {
        match other(k) {
            Some(PyValue::Object { class, .. }) if Some(class.as_str()) == v.as_str() => {}
            got => err(format!("top-level {k}: {got:?}, expected an object of class {v}")),
        }
    }
    for (k, v) in case["bigints"].as_object().into_iter().flatten() {
        match other(k) {
            Some(PyValue::BigInt(s)) if Some(s.as_str()) == v.as_str() => {}
            got => err(format!("top-level {k}: {got:?}, expected int {v}")),
        }
    }
    for (k, v) in case["bytes"].as_object().into_iter().flatten() {
        let want: Vec<u8> = v.as_array().map(|a| a.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect()).unwrap_or_default();
        match other(k) {
            Some(PyValue::Bytes(b)) if *b == want => {}
            got => err(format!("top-level {k}: {got:?}, expected bytes {want:?}")),
        }
    }
    for k in str_list(&case["nones"]) {
        if other(&k) != Some(&PyValue::None) {
            err(format!("top-level {k}: {:?}, expected None", other(&k)));
        }
    }
}

#[test]
fn every_case_matches_torch_load() {
    let dir = cases_dir();
    let cases = expected_cases();
    assert!(cases.len() >= 20, "expected.json lists only {} cases", cases.len());
    let mut errors = Vec::new();
    for (name, case) in &cases {
        let path = dir.join(name);
        let started = Instant::now();
        let result = load_state_dict(&path);
        let took = started.elapsed();
        let expect = case["expect"].as_str().unwrap_or_default();
        match (expect, result) {
            ("ok", Ok(sd)) => {
                eprintln!("{name}: {} tensors in {took:.2?}", sd.len());
                check_ok(name, &sd, case, &mut errors);
            }
            ("ok", Err(e)) => errors.push(format!("{name}: expected success, got {e}")),
            (kind, Ok(sd)) => errors.push(format!("{name}: expected error {kind}, got a state dict of {} tensors", sd.len())),
            (kind, Err(e)) => {
                let msg = e.to_string();
                eprintln!("{name}: {msg}");
                if e.kind() != kind {
                    errors.push(format!("{name}: error kind {} ({msg}), expected {kind}", e.kind()));
                }
                if !msg.contains(&path.display().to_string()) {
                    errors.push(format!("{name}: error does not name the file: {msg}"));
                }
                for want in str_list(&case["error_contains"]) {
                    if !msg.contains(&want) {
                        errors.push(format!("{name}: error {msg:?} does not mention {want:?}"));
                    }
                }
            }
        }
    }
    assert!(errors.is_empty(), "{} mismatches:\n{}", errors.len(), errors.join("\n"));
}

#[test]
fn no_state_dict_lists_top_level_keys() {
    let path = cases_dir().join("no_tensors.pth");
    match load_state_dict(&path) {
        Err(CheckpointError::NoStateDict { top_level_keys, .. }) => {
            assert_eq!(top_level_keys, ["epoch", "lr", "model"]);
        }
        other => panic!("expected NoStateDict, got {other:?}"),
    }
}

#[test]
fn fasterrcnn_state_dict_has_torchvision_layout() {
    let path = cases_dir().join("fasterrcnn_mobilenet_v3_large_320_fpn.pth");
    let started = Instant::now();
    let sd = load_state_dict(&path).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} tensors read in {:.2?}", sd.len(), started.elapsed());
    assert_eq!(sd.wrapper.as_deref(), Some("model_state_dict"));
    assert_eq!(sd.other("epoch").and_then(PyValue::as_i64), Some(3));
    // Architecture facts of torchvision's constructor with num_classes=3: 15 anchors per
    // location (5 sizes x 3 ratios), a 1024-wide box head, 4 box deltas per class.
    let shape = |k: &str| sd.get(k).map(|t| t.shape().to_vec());
    assert_eq!(shape("rpn.head.cls_logits.weight"), Some(vec![15, 256, 1, 1]));
    assert_eq!(shape("roi_heads.box_predictor.cls_score.weight"), Some(vec![3, 1024]));
    assert_eq!(shape("roi_heads.box_predictor.bbox_pred.weight"), Some(vec![12, 1024]));
    let params: usize = sd.iter().map(|(_, t)| t.numel()).sum();
    assert!(params > 15_000_000, "only {params} elements");
}

fn same_tensors(a: &StateDict, b: &StateDict) -> bool {
    a.len() == b.len() && a.wrapper == b.wrapper && a.iter().zip(b.iter()).all(|(x, y)| x == y)
}

/// Run `load` on a damaged copy; a panic is reported, never propagated.
fn load_damaged(bytes: &[u8], label: &Path) -> Result<Result<StateDict, CheckpointError>, String> {
    catch_unwind(AssertUnwindSafe(|| load_state_dict_from_bytes(bytes, label)))
        .map_err(|p| p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default())
}

#[test]
fn damaged_copies_are_errors_not_panics() {
    for name in ["bare_state_dict.pth", "views.pth", "wrapped_model_state_dict.pth"] {
        let path = cases_dir().join(name);
        let original = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let reference = load_state_dict_from_bytes(&original, &path).unwrap_or_else(|e| panic!("{e}"));
        let from_file = load_state_dict(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(same_tensors(&reference, &from_file));

        let mut problems = Vec::new();
        // Every truncation loses the zip's end-of-central-directory record at least.
        for len in 0..original.len() {
            match load_damaged(&original[..len], &path) {
                Ok(Err(_)) => {}
                Ok(Ok(_)) => problems.push(format!("truncated to {len} bytes: read without error")),
                Err(msg) => problems.push(format!("truncated to {len} bytes: panic {msg}")),
            }
        }
        // A flipped byte is either caught (CRCs, zip structure, pickle checks) or lies in
        // bytes that do not matter; it must never change what is read.
        let mut caught = 0;
        for pos in 0..original.len() {
            for mask in [0x01u8, 0xff] {
                let mut damaged = original.clone();
                damaged[pos] ^= mask;
                match load_damaged(&damaged, &path) {
                    Ok(Err(_)) => caught += 1,
                    Ok(Ok(sd)) => {
                        if !same_tensors(&sd, &reference) {
                            problems.push(format!("byte {pos} ^ {mask:#04x}: silently different tensors"));
                        }
                    }
                    Err(msg) => problems.push(format!("byte {pos} ^ {mask:#04x}: panic {msg}")),
                }
            }
        }
        eprintln!("{name}: {caught} of {} flips caught", original.len() * 2);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
    }
}

/// Rewrite a zip archive with `edit` applied to each record's bytes (fresh CRCs), so that
/// damage inside `data.pkl` reaches the pickle interpreter instead of the CRC check.
fn rezip(original: &[u8], edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(Cursor::new(original)).expect("fixture is a zip");
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut record = zin.by_index(i).expect("fixture record");
        let name = record.name().expect("record name").into_owned();
        let mut data = Vec::new();
        record.read_to_end(&mut data).expect("fixture record data");
        drop(record);
        out.start_file(name.as_str(), options).expect("zip write");
        out.write_all(&edit(&name, data)).expect("zip write");
    }
    out.finish().expect("zip finish").into_inner()
}

#[test]
fn damaged_pickles_are_errors_not_panics() {
    for name in ["views.pth", "wrapped_model_state_dict.pth", "dtypes.pth"] {
        let path = cases_dir().join(name);
        let original = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let reference = load_state_dict_from_bytes(&original, &path).unwrap_or_else(|e| panic!("{e}"));
        let same = rezip(&original, |_, d| d);
        let resaved = load_state_dict_from_bytes(&same, &path).unwrap_or_else(|e| panic!("{e}"));
        assert!(same_tensors(&reference, &resaved), "{name}: rezipped copy differs");

        let pkl_len = {
            let mut zin = zip::ZipArchive::new(Cursor::new(&original[..])).expect("zip");
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let size = zin.by_name(&format!("{stem}/data.pkl")).expect("data.pkl").size();
            size as usize
        };
        let mut problems = Vec::new();
        let mut caught = 0;
        for len in 0..pkl_len {
            let damaged = rezip(&original, |n, mut d| {
                if n.ends_with("/data.pkl") {
                    d.truncate(len);
                }
                d
            });
            match load_damaged(&damaged, &path) {
                Ok(Err(_)) => {}
                Ok(Ok(_)) => problems.push(format!("data.pkl cut to {len} bytes: no error")),
                Err(msg) => problems.push(format!("data.pkl cut to {len} bytes: panic {msg}")),
            }
        }
        // A changed pickle may legitimately describe other tensors; it must not panic.
        for pos in 0..pkl_len {
            for mask in [0x01u8, 0xff] {
                let damaged = rezip(&original, |n, mut d| {
                    if n.ends_with("/data.pkl") {
                        d[pos] ^= mask;
                    }
                    d
                });
                match load_damaged(&damaged, &path) {
                    Ok(Err(_)) => caught += 1,
                    Ok(Ok(_)) => {}
                    Err(msg) => problems.push(format!("data.pkl byte {pos} ^ {mask:#04x}: panic {msg}")),
                }
            }
        }
        eprintln!("{name}: {caught} of {} data.pkl flips are errors", pkl_len * 2);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
    }
}
