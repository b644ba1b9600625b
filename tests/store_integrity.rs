//! A damaged store never makes a wrong model: a flipped bit in a stored artifact is found
//! before anything reads it (or by `mkonnx verify`), the blob is quarantined and rebuilt, and
//! `--force` replaces it instead of keeping it because a blob of that name exists.

mod common;
use common::{copy_run, mkonnx, text};
use std::path::{Path, PathBuf};

/// The store blob whose bytes contain `needle`.
fn blob_containing(store: &Path, needle: &[u8]) -> PathBuf {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(store.join("blobs")).unwrap() {
        for blob in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let p = blob.unwrap().path();
            if std::fs::read(&p).unwrap().windows(needle.len()).any(|w| w == needle) {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Replaces `from` by `to` (same length) in a read-only blob, as a disk error would.
fn damage(blob: &Path, from: &[u8], to: &[u8]) {
    let mut bytes = std::fs::read(blob).unwrap();
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + to.len()].copy_from_slice(to);
    std::fs::set_permissions(blob, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(blob, bytes).unwrap();
}

#[test]
fn a_damaged_artifact_is_found_quarantined_and_rebuilt_never_used() {
    let t = tempfile::tempdir().unwrap();
    let dir = copy_run("mobilenet_v3_large_320_fpn", &t.path().join("run"), false);
    let store = t.path().join("store");
    let sample = t.path().join("sample.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])).save(&sample).unwrap();
    let build = |extra: &[&str]| {
        let mut args = vec!["build", dir.to_str().unwrap(), "--image-input", sample.to_str().unwrap(), "--no-parity-check"];
        args.extend(extra);
        let o = mkonnx(&args, &store);
        assert!(o.status.success(), "{}", text(&o));
    };
    build(&[]);
    let model = std::fs::read(dir.join("onnx_model/model.onnx")).unwrap();
    let summary = std::fs::read_to_string(dir.join("onnx_model/conversion_summary.txt")).unwrap();
    assert!(summary.contains("min_size        320"), "{summary}");

    // The resolved model.json says 330 instead of 320; --force reruns every stage.
    let resolved = blob_containing(&store, b"\"min_size\": 320");
    damage(&resolved, b"\"min_size\": 320", b"\"min_size\": 330");
    build(&["--force"]);
    assert_eq!(std::fs::read(dir.join("onnx_model/model.onnx")).unwrap(), model, "a model built from the damaged blob");
    assert_eq!(std::fs::read_to_string(dir.join("onnx_model/conversion_summary.txt")).unwrap(), summary);
    assert!(std::fs::read_to_string(&resolved).unwrap().contains("\"min_size\": 320"), "the damaged blob was kept");

    // A damaged model.onnx blob while the run directory is intact: `verify` finds it.
    let onnx_blob = blob_containing(&store, &model[..64.min(model.len())]);
    let tail = model.len() - 8;
    damage(&onnx_blob, &model[tail..], &[0u8; 8]);
    let o = mkonnx(&["verify"], &store);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("damaged: ") && text(&o).contains(onnx_blob.to_str().unwrap()), "{}", text(&o));
    assert_eq!(std::fs::read_dir(store.join("quarantine")).unwrap().count(), 1);
    let o = mkonnx(&["verify"], &store);
    assert!(o.status.success(), "{}", text(&o));
    // The next build makes it again; the run directory's copy never changed.
    std::fs::remove_file(dir.join("onnx_model/model.onnx")).unwrap();
    build(&[]);
    assert_eq!(std::fs::read(dir.join("onnx_model/model.onnx")).unwrap(), model);
    assert!(mkonnx(&["verify"], &store).status.success());
}
