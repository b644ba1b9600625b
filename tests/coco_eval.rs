//! COCO bbox evaluation against pycocotools, on the cases that
//! `reference/coco_cases.py` writes to `$MKONNX_FIXTURES/coco/`: every one of the 12
//! stats within 1e-9 and the printed summary character for character.

mod common;
use common::fixtures_dir;

use std::path::{Path, PathBuf};

use mkonnx::eval::coco::{evaluate_files, iou_thresholds, rec_thresholds, summary_text, CocoError, CocoMetrics};
use serde::Deserialize;

/// The generated fixtures' root (`make fixtures` prints it).

#[derive(Deserialize)]
struct Expected {
    iou_thrs: Vec<f64>,
    rec_thrs: Vec<f64>,
    cases: Vec<Case>,
    bench: Case,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    gt: String,
    dt: String,
    stats: Option<Vec<f64>>,
    summary: Option<String>,
    error: Option<String>,
}

fn coco_dir() -> PathBuf {
    fixtures_dir().join("coco")
}

fn load_expected(dir: &Path) -> Expected {
    let path = dir.join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Checks one case; returns a description of each disagreement.
fn check_case(dir: &Path, case: &Case) -> Vec<String> {
    let result = evaluate_files(&dir.join(&case.gt), &dir.join(&case.dt));
    let mut problems = Vec::new();
    match (&case.error, result) {
        (Some(_), Err(CocoError::UnknownImages { .. })) => {}
        (Some(e), Ok(m)) => problems.push(format!("pycocotools refused ({e}) but got stats {:?}", m.stats)),
        (Some(e), Err(other)) => problems.push(format!("pycocotools refused ({e}), got another error: {other}")),
        (None, Err(e)) => problems.push(format!("unexpected error: {e}")),
        (None, Ok(m)) => problems.extend(compare(case, &m)),
    }
    problems.into_iter().map(|p| format!("{}: {p}", case.name)).collect()
}

fn compare(case: &Case, m: &CocoMetrics) -> Vec<String> {
    let mut problems = Vec::new();
    let want = case.stats.as_ref().expect("stats for a case without error");
    assert_eq!(want.len(), 12, "{}: expected.json holds 12 stats", case.name);
    for (i, (&got, &exp)) in m.stats.iter().zip(want.iter()).enumerate() {
        if (got - exp).abs() > 1e-9 {
            problems.push(format!("stat {i}: got {got:?}, pycocotools {exp:?}"));
        }
    }
    let text = summary_text(m);
    let want_text = case.summary.as_deref().unwrap_or_default();
    if text != want_text {
        problems.push(format!("summary differs:\n--- mkonnx\n{text}--- pycocotools\n{want_text}"));
    }
    // The named fields are the stats array, by name.
    let named = [m.ap, m.ap50, m.ap75, m.ap_small, m.ap_medium, m.ap_large, m.ar1, m.ar10, m.ar100, m.ar_small, m.ar_medium, m.ar_large];
    if named != m.stats {
        problems.push(format!("named fields {named:?} differ from stats {:?}", m.stats));
    }
    problems
}

#[test]
fn thresholds_are_pycocotools_own() {
    let exp = load_expected(&coco_dir());
    assert_eq!(exp.iou_thrs, iou_thresholds().to_vec());
    assert_eq!(exp.rec_thrs, rec_thresholds().to_vec());
}

#[test]
fn every_case_matches_pycocotools() {
    let dir = coco_dir();
    let exp = load_expected(&dir);
    assert!(exp.cases.len() >= 15, "expected.json lists only {} cases", exp.cases.len());
    let problems: Vec<String> = exp.cases.iter().flat_map(|c| check_case(&dir, c)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn bench_case_matches_pycocotools() {
    let dir = coco_dir();
    let exp = load_expected(&dir);
    let problems = check_case(&dir, &exp.bench);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn unknown_image_error_names_the_results_file() {
    let dir = coco_dir();
    let exp = load_expected(&dir);
    let case = exp.cases.iter().find(|c| c.error.is_some()).expect("a case that pycocotools refuses");
    let err = evaluate_files(&dir.join(&case.gt), &dir.join(&case.dt)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&case.dt), "{msg}");
    assert!(msg.contains("do not correspond"), "{msg}");
}

#[test]
fn metrics_json_round_trips() {
    let dir = coco_dir();
    let exp = load_expected(&dir);
    let case = &exp.cases[0];
    let m = evaluate_files(&dir.join(&case.gt), &dir.join(&case.dt)).unwrap();
    let text = serde_json::to_string(&m).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"] {
        assert!(v.get(key).is_some(), "{key} missing from {text}");
    }
    assert_eq!(v["stats"].as_array().map(Vec::len), Some(12));
    let back: CocoMetrics = serde_json::from_str(&text).unwrap();
    assert_eq!(back, m);
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let tmp = std::env::temp_dir().join(format!("mkonnx-coco-eval-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let gt = tmp.join("gt.json");
    let dt = tmp.join("dt.json");
    std::fs::write(
        &gt,
        r#"{"images":[{"id":1}],"annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[0,0,1,1]}],"categories":[{"id":1}]}"#,
    )
    .unwrap();
    std::fs::write(&dt, "[]").unwrap();
    let err = evaluate_files(&gt, &dt).unwrap_err();
    assert!(matches!(err, CocoError::GroundTruthJson { .. }), "{err}");
    assert!(err.to_string().contains("gt.json") && err.to_string().contains("area"), "{err}");

    std::fs::write(&gt, r#"{"images":[{"id":1}],"categories":[{"id":1}]}"#).unwrap();
    std::fs::write(&dt, r#"{"image_id":1}"#).unwrap();
    let err = evaluate_files(&gt, &dt).unwrap_err();
    assert!(matches!(err, CocoError::ResultsJson { .. }), "{err}");
    assert!(err.to_string().contains("dt.json"), "{err}");

    let err = evaluate_files(&tmp.join("missing.json"), &dt).unwrap_err();
    assert!(matches!(err, CocoError::Read { .. }), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}

/// The reference eval app's own files (eager torchvision predictions on the fixture runs,
/// pycocotools' stats): our evaluation of the same files gives the same 12 stats.
#[test]
fn fixture_runs_predictions_match_pycocotools() {
    let root = fixtures_dir();
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("runs.json")).unwrap()).unwrap();
    for run in index["runs"].as_array().unwrap() {
        let dir = root.join(run["eval_dir"].as_str().unwrap());
        let ours = mkonnx::eval::coco::evaluate_files(&dir.join("ground_truth_coco.json"), &dir.join("pytorch_predictions.json")).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pytorch_metrics.json")).unwrap()).unwrap();
        for (i, (a, b)) in ours.stats.iter().zip(theirs["stats"].as_array().unwrap()).enumerate() {
            let b = b.as_f64().unwrap();
            assert!((a - b).abs() <= 1e-9, "{} stat {i}: ours {a} pycocotools {b}", run["name"]);
        }
    }
}
