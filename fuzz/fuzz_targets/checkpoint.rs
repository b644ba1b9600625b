//! The checkpoint reader on arbitrary bytes: zip container, `data.pkl` and storage records
//! as one file. It must return (an error) without panicking and without allocating more
//! than libFuzzer's `-malloc_limit_mb`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = mkonnx::data::checkpoint::load_state_dict_from_bytes(data, Path::new("fuzz/best_model.pth"));
});
