//! The pickle interpreter and state-dict extraction: the input is `data.pkl` of a
//! well-formed archive (fresh CRCs, storage records `data/0` .. `data/15`), so mutations
//! reach the interpreter instead of failing the zip checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Write};
use std::path::Path;

/// Storage records the pickle can name: 16 of 4 KB (1024 float32 each), enough for the
/// tensors of the seed checkpoints.
const STORAGES: usize = 16;
const STORAGE_BYTES: usize = 4096;

fn archive(pkl: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut put = |name: &str, data: &[u8]| {
        zip.start_file(name, options).expect("in-memory zip");
        zip.write_all(data).expect("in-memory zip");
    };
    put("archive/data.pkl", pkl);
    put("archive/byteorder", b"little");
    let storage: Vec<u8> = (0..STORAGE_BYTES / 4).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    for key in 0..STORAGES {
        put(&format!("archive/data/{key}"), &storage);
    }
    zip.finish().expect("in-memory zip").into_inner()
}

fuzz_target!(|pkl: &[u8]| {
    let bytes = archive(pkl);
    let _ = mkonnx::data::checkpoint::load_state_dict_from_bytes(&bytes, Path::new("fuzz/best_model.pth"));
});
