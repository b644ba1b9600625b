//! Hostile and unlucky checkpoints (issue 15): files crafted to make the reader allocate
//! far more than they hold. Each must be a clear error naming the file and the limit it
//! hit, with the `mkonnx` process staying small.
//!
//! The files are written here, byte by byte, into temporary run directories: nothing
//! crafted is committed. These tests need no fixtures.
//!
//! The peak RSS that [`output_with_peak_rss`] reports is at least the test process's own
//! peak (the kernel credits a `vfork`ed child with its parent's high-water mark at exec),
//! so each test runs `mkonnx` before it loads anything in process, and the figures are
//! exact only for a test run alone (`cargo test --test hostile_checkpoint -- --exact <name>`).

mod common;
use common::{mkonnx_binary, mkonnx_command_for, output_with_peak_rss, text};

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use mkonnx::data::checkpoint::{load_state_dict_from_bytes, CheckpointError, StateDict};

/// Peak resident memory allowed to `mkonnx` on any crafted file under 1 MB.
const PEAK_RSS_LIMIT: u64 = 512 << 20;

/// A protocol-2 pickle written opcode by opcode, as `torch.save` writes `data.pkl`.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }

    fn op(&mut self, bytes: &[u8]) -> &mut Pickle {
        self.0.extend_from_slice(bytes);
        self
    }

    /// BINUNICODE
    fn str(&mut self, s: &str) -> &mut Pickle {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }

    /// BININT1 / BININT2 / BININT / LONG1, as pickle picks them.
    fn int(&mut self, v: i64) -> &mut Pickle {
        match v {
            0..=0xff => self.op(&[b'K', v as u8]),
            0x100..=0xffff => self.op(b"M").op(&(v as u16).to_le_bytes()),
            _ if i32::try_from(v).is_ok() => self.op(b"J").op(&(v as i32).to_le_bytes()),
            _ => self.op(&[0x8a, 8]).op(&v.to_le_bytes()),
        }
    }

    /// GLOBAL
    fn global(&mut self, module: &str, name: &str) -> &mut Pickle {
        self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
    }

    fn int_tuple(&mut self, values: &[i64]) -> &mut Pickle {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` over the
    /// float32 storage record `data/<key>` of `storage_numel` elements.
    fn tensor(&mut self, key: &str, storage_numel: i64, offset: i64, shape: &[i64], stride: &[i64]) -> &mut Pickle {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(").str("storage").global("torch", "FloatStorage").str(key).str("cpu").int(storage_numel).op(b"tQ");
        self.int(offset).int_tuple(shape).int_tuple(stride).op(b"\x89");
        self.global("collections", "OrderedDict").op(b")R").op(b"tR")
    }

    fn finish(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.0)
    }
}

/// A `torch.save` zip: `archive/data.pkl`, `archive/byteorder` and `archive/data/<key>` per
/// storage, stored (as torch writes them) or deflated.
fn checkpoint(pkl: &[u8], storages: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let method = if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pkl).unwrap();
    zip.start_file("archive/byteorder", options).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, data) in storages {
        zip.start_file(format!("archive/data/{key}"), options.compression_method(method)).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// `{"w": <tensor>}` over one float32 storage `0` of `storage` bytes.
fn one_tensor(shape: &[i64], stride: &[i64], storage: &[u8]) -> Vec<u8> {
    let numel = (storage.len() / 4) as i64;
    let pkl = Pickle::new().op(b"}(").str("w").tensor("0", numel, 0, shape, stride).op(b"u").finish();
    checkpoint(&pkl, &[("0", storage)], false)
}

/// A run directory holding `bytes` as its checkpoint and a minimal Hydra config, plus a
/// small PNG for `--image-input`.
struct Run {
    _dir: tempfile::TempDir,
    run: PathBuf,
    image: PathBuf,
    store: PathBuf,
}

fn run_with(bytes: &[u8]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join(".hydra")).unwrap();
    std::fs::write(run.join(".hydra/config.yaml"), "model:\n  name: fasterrcnn_mobilenet_v3_large_320_fpn\n").unwrap();
    std::fs::write(run.join("best_model.pth"), bytes).unwrap();
    let image = dir.path().join("image.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([40, 90, 160])).save(&image).unwrap();
    let store = dir.path().join("store");
    Run { _dir: dir, run, image, store }
}

/// Runs `mkonnx build` on a run whose checkpoint is `bytes`; asserts that it fails, that its
/// message names the checkpoint and contains every one of `expect`, and that the process
/// stayed under [`PEAK_RSS_LIMIT`]. Returns the peak RSS in bytes.
fn build_fails(label: &str, bytes: &[u8], expect: &[&str]) -> u64 {
    assert!(bytes.len() < 1 << 20, "{label}: crafted file is {} bytes, keep it under 1 MB", bytes.len());
    let r = run_with(bytes);
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &r.store);
    cmd.arg("build").arg(&r.run).arg("--image-input").arg(&r.image).arg("--no-parity-check");
    let (out, peak) = output_with_peak_rss(&mut cmd);
    let msg = text(&out);
    eprintln!("{label}: {} bytes, peak RSS {:.1} MB\n{msg}", bytes.len(), peak as f64 / 1e6);
    assert!(!out.status.success(), "{label}: mkonnx build succeeded:\n{msg}");
    assert!(msg.contains("best_model.pth"), "{label}: the message does not name the file:\n{msg}");
    for e in expect {
        assert!(msg.contains(e), "{label}: the message lacks {e:?}:\n{msg}");
    }
    assert!(peak < PEAK_RSS_LIMIT, "{label}: peak RSS {peak} bytes");
    peak
}

fn load(bytes: &[u8]) -> Result<StateDict, CheckpointError> {
    load_state_dict_from_bytes(bytes, Path::new("crafted/best_model.pth"))
}

fn expect_kind(bytes: &[u8], kind: &str) -> CheckpointError {
    match load(bytes) {
        Ok(sd) => panic!("loaded {} tensors, expected a {kind} error", sd.len()),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains("crafted/best_model.pth"), "{e}");
            e
        }
    }
}

/// Finding 1: one tensor of size [2^30], stride 0, over a 4-byte storage (603 bytes) used
/// to allocate 4 GB and abort.
#[test]
fn broadcast_view_of_a_tiny_storage() {
    let bytes = one_tensor(&[1 << 30], &[0], &f32_bytes([1.5]));
    assert!(bytes.len() < 1024, "{} bytes", bytes.len());
    build_fails("stride 0, 2^30", &bytes, &["tensor \"w\"", "stride [0]", "limit"]);
    let e = expect_kind(&bytes, "tensor_budget");
    let msg = e.to_string();
    for want in ["\"w\"", "size [1073741824]", "stride [0]", "broadcast"] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
}

/// Size [2^62] with stride 0: the byte count (2^64) must not wrap to 0.
#[test]
fn byte_count_does_not_wrap() {
    let bytes = one_tensor(&[1 << 62], &[0], &f32_bytes([1.5]));
    build_fails("stride 0, 2^62", &bytes, &["tensor \"w\"", "limit"]);
    let msg = expect_kind(&bytes, "tensor_budget").to_string();
    assert!(msg.contains("needs 18446744073709551616 more bytes"), "{msg}");
    assert!(msg.contains("4611686018427387904 elements"), "{msg}");
    // Wider still: the element count itself overflows 64 bits.
    let bytes = one_tensor(&[1 << 62, 1 << 62], &[0, 0], &f32_bytes([1.5]));
    expect_kind(&bytes, "invalid_tensor");
}

/// Overlapping (not zero) strides: a [2^15, 2^15] view with strides [1, 1] reaches 2^16
/// elements (256 KB) but names 2^30.
#[test]
fn overlapping_strides() {
    let storage = f32_bytes((0..(1 << 16)).map(|i| i as f32));
    let bytes = one_tensor(&[1 << 15, 1 << 15], &[1, 1], &storage);
    build_fails("overlapping strides", &bytes, &["tensor \"w\"", "stride [1, 1]"]);
    let msg = expect_kind(&bytes, "tensor_budget").to_string();
    assert!(msg.contains("stride [1, 1]") && msg.contains("overlapping"), "{msg}");
}

/// torch saves an expanded tensor as a stride-0 view, and loads it back: a small one is
/// read like any other tensor.
#[test]
fn small_broadcast_and_overlapping_views_load() {
    let bytes = one_tensor(&[4, 3], &[0, 1], &f32_bytes([1.0, 2.0, 3.0]));
    let sd = load(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sd.get("w").unwrap().to_f32(), [1., 2., 3., 1., 2., 3., 1., 2., 3., 1., 2., 3.]);
    // A sliding window: rows overlap by two elements.
    let bytes = one_tensor(&[3, 3], &[1, 1], &f32_bytes([1.0, 2.0, 3.0, 4.0, 5.0]));
    let sd = load(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sd.get("w").unwrap().to_f32(), [1., 2., 3., 2., 3., 4., 3., 4., 5.]);
}

/// Many tensors over one storage, each a full (non-overlapping) view that has to be
/// copied out of it: each is fine, together they are 200 times the file.
#[test]
fn storage_shared_by_many_tensors() {
    let n = 1 << 17; // 512 KB of float32
    let storage = f32_bytes((0..n).map(|i| i as f32));
    let mut p = Pickle::new();
    p.op(b"}(");
    for i in 0..200 {
        // Transposed views: not contiguous, so each is a copy.
        p.str(&format!("w{i}")).tensor("0", n, 0, &[256, 512], &[1, 256]);
    }
    let bytes = checkpoint(&p.op(b"u").finish(), &[("0", &storage)], false);
    build_fails("shared storage", &bytes, &["tensor \"w", "limit"]);
    let msg = expect_kind(&bytes, "tensor_budget").to_string();
    assert!(msg.contains("stride [1, 256]"), "{msg}");
}

/// Deflated records may inflate to any size up to the file's: 120 records of 800 KB of
/// zeros in a file under 1 MB.
#[test]
fn inflating_records() {
    let zeros = vec![0u8; 800 << 10];
    // Incompressible padding (xorshift), so that the file is larger than each record.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let padding: Vec<u8> = (0..(820 << 10))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let numel = (zeros.len() / 4) as i64;
    let mut p = Pickle::new();
    p.op(b"}(");
    let keys: Vec<String> = (0..120).map(|i| i.to_string()).collect();
    for k in &keys {
        p.str(&format!("w{k}")).tensor(k, numel, 0, &[1], &[1]);
    }
    let pkl = p.op(b"u").finish();
    let mut storages: Vec<(&str, &[u8])> = keys.iter().map(|k| (k.as_str(), zeros.as_slice())).collect();
    storages.push(("padding", &padding));
    let bytes = checkpoint(&pkl, &storages, true);
    assert!(bytes.len() < 1 << 20 && bytes.len() > zeros.len(), "{} bytes", bytes.len());
    build_fails("inflating records", &bytes, &["tensor \"w", "limit"]);
    expect_kind(&bytes, "tensor_budget");
}

/// Finding 2: 100k REDUCEs of one global over one shared 100k-item tuple (about 800 KB)
/// used to copy the tuple for every call: 80 GB.
#[test]
fn calls_sharing_one_argument_tuple() {
    let mut p = Pickle::new();
    p.op(b"(");
    for _ in 0..100_000 {
        p.op(b"N");
    }
    p.op(b"t\x94"); // memo 0: the tuple
    p.global("builtins", "print").op(b"\x94"); // memo 1: the callable
    p.op(b"0"); // pop it; the memo keeps it
    for _ in 0..100_000 {
        p.op(b"h\x01h\x00R0"); // BINGET 1, BINGET 0, REDUCE, POP
    }
    let bytes = checkpoint(&p.op(b"}").finish(), &[], false);
    assert!(bytes.len() > 700_000, "{} bytes", bytes.len());
    build_fails("shared REDUCE arguments", &bytes, &["data.pkl", "REDUCE", "limit"]);
    let msg = expect_kind(&bytes, "pickle_budget").to_string();
    assert!(msg.contains("REDUCE"), "{msg}");
}

/// Finding 2b: 200k top-level keys whose values are one shared 250k-node list (800 KB)
/// next to a valid state dict: converting the extras used to expand the list for every key.
#[test]
fn extras_sharing_one_big_list() {
    let mut p = Pickle::new();
    p.op(b"}(").str("model_state_dict").op(b"}(").str("w").tensor("0", 1, 0, &[1], &[1]).op(b"u");
    // memo 0: 500 Nones; memo 1: 500 references to it (250k nodes); memo 2: a key.
    p.op(b"](");
    for _ in 0..500 {
        p.op(b"N");
    }
    p.op(b"e\x940");
    p.str("history").op(b"](");
    for _ in 0..500 {
        p.op(b"h\x00");
    }
    p.op(b"e\x94").str("k").op(b"\x94").op(b"h\x01");
    for _ in 0..200_000 {
        // The same key and the same list (duplicate keys are kept as they come).
        p.op(b"h\x02h\x01");
    }
    let bytes = checkpoint(&p.op(b"u").finish(), &[("0", &f32_bytes([1.0]))], false);
    assert!(bytes.len() < 1 << 20 && bytes.len() > 800_000, "{} bytes", bytes.len());
    build_fails("shared list in the extras", &bytes, &["data.pkl", "top-level entry", "limit"]);
    let msg = expect_kind(&bytes, "pickle_budget").to_string();
    assert!(msg.contains("converting top-level entry"), "{msg}");
}

/// One long string shared as the key of every state-dict entry.
#[test]
fn state_dict_keys_sharing_one_string() {
    let mut p = Pickle::new();
    p.op(b"}(").str(&"k".repeat(200_000)).op(b"\x94").tensor("0", 1, 0, &[1], &[1]);
    for _ in 0..100_000 {
        p.op(b"h\x00N");
    }
    let bytes = checkpoint(&p.op(b"u").finish(), &[("0", &f32_bytes([1.0]))], false);
    build_fails("shared state-dict key", &bytes, &["data.pkl", "state-dict keys", "limit"]);
    let msg = expect_kind(&bytes, "pickle_budget").to_string();
    assert!(msg.contains("state-dict keys"), "{msg}");
}
