//! The dataset index parser: the input is `dataset.jsonl` of a dataset directory that holds
//! `data/a.png` and `data/b.jpg`. `Dataset::load` is the public entry point (it reads the
//! index from a directory), so each input is written to one temporary directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mkonnx::data::dataset::{Dataset, INDEX_FILE};
use std::path::PathBuf;
use std::sync::OnceLock;

fn dataset_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Kept for the life of the fuzzing process (the directory is small).
        let dir = tempfile::Builder::new().prefix("mkonnx-fuzz-dataset").tempdir().expect("temp dir").keep();
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        for image in ["a.png", "b.jpg"] {
            std::fs::write(dir.join("data").join(image), b"").expect("image file");
        }
        dir
    })
}

fuzz_target!(|index: &[u8]| {
    let dir = dataset_dir();
    std::fs::write(dir.join(INDEX_FILE), index).expect("write dataset.jsonl");
    if let Ok(ds) = Dataset::load(dir) {
        for classes in [1, 2, 91] {
            let _ = ds.check_labels(classes);
        }
    }
});
