//! Running ONNX models in the test-time reference runtimes (ONNX Runtime and OpenVINO through
//! their Python packages, `tests/openvino_infer.py`), for tests that compare a graph's
//! outputs across runtimes or with torchvision.

use super::*;
use mkonnx::model::Detector;
use mkonnx::runtime::ImageBatch;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor handed to or returned by the Python helper: raw little-endian values.
pub enum Tensor {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One output of one run, as the helper wrote it.
pub struct Output {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values.
    pub data: Tensor,
}

impl Output {
    /// The float32 values.
    pub fn f32s(&self) -> &[f32] {
        match &self.data {
            Tensor::F32(v) => v,
            Tensor::I64(_) => panic!("expected float32"),
        }
    }
    /// The int64 values.
    pub fn i64s(&self) -> &[i64] {
        match &self.data {
            Tensor::I64(v) => v,
            Tensor::F32(_) => panic!("expected int64"),
        }
    }
}

/// A batch of work for `tests/openvino_infer.py`: models, each with its runs' inputs written
/// as raw files, all served by one Python process.
pub struct Job {
    /// Where the models and inputs are written.
    pub dir: tempfile::TempDir,
    models: Vec<Value>,
    files: usize,
}

impl Job {
    pub fn new() -> Job {
        Job { dir: tempfile::tempdir().unwrap(), models: Vec::new(), files: 0 }
    }

    /// Adds the model file `path` to run in `runtime` (`openvino` or `onnxruntime`), returning
    /// the named outputs.
    pub fn add_model(&mut self, path: &Path, runtime: &str, outputs: &[&str]) -> usize {
        self.models.push(json!({"path": path, "runtime": runtime, "outputs": outputs, "runs": []}));
        self.models.len() - 1
    }

    /// Exports `det` into the job's folder, to run in OpenVINO.
    pub fn add_detector(&mut self, det: &Detector) -> usize {
        let path = self.dir.path().join(format!("model{}.onnx", self.models.len()));
        std::fs::write(&path, mkonnx::onnx::encode(&mkonnx::onnx::export(det).unwrap())).unwrap();
        self.add_model(&path, "openvino", &["location", "score", "category"])
    }

    /// Queues a run of `model` on the named inputs.
    pub fn add_run(&mut self, model: usize, inputs: &[(&str, &[usize], Tensor)]) {
        let mut feeds = serde_json::Map::new();
        for (name, shape, data) in inputs {
            let path = self.dir.path().join(format!("input{}.bin", self.files));
            self.files += 1;
            let (bytes, dtype): (Vec<u8>, &str) = match data {
                Tensor::F32(v) => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), "float32"),
                Tensor::I64(v) => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), "int64"),
            };
            std::fs::write(&path, bytes).unwrap();
            feeds.insert(name.to_string(), json!({"file": path, "dtype": dtype, "shape": shape}));
        }
        self.models[model]["runs"].as_array_mut().unwrap().push(Value::Object(feeds));
    }

    /// Queues a run of detector `model` on `batch`.
    pub fn add_batch(&mut self, model: usize, batch: &ImageBatch) {
        let shape = [batch.len, 3, batch.height, batch.width];
        self.add_run(model, &[("input", &shape, Tensor::F32(batch.data.clone()))]);
    }

    /// Runs everything; per model, per run, the outputs by name.
    pub fn run(self) -> Vec<Vec<BTreeMap<String, Output>>> {
        let job = self.dir.path().join("job.json");
        let out = self.dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(&job, json!({"models": self.models}).to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openvino_infer.py");
        let o = std::process::Command::new(python()).arg(&script).arg(&job).arg(&out).output().expect("run python");
        assert!(
            o.status.success(),
            "OpenVINO inference failed (is `openvino` from reference/requirements.txt installed in .venv?): {}",
            text(&o)
        );
        let index: Value = serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
        eprintln!("OpenVINO {}", index["openvino"]);
        let read = |spec: &Value| {
            let bytes = std::fs::read(spec["file"].as_str().unwrap()).unwrap();
            let shape = spec["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let data = match spec["dtype"].as_str().unwrap() {
                "float32" => Tensor::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()),
                "int64" => Tensor::I64(bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
                other => panic!("unexpected output type {other}"),
            };
            Output { shape, data }
        };
        index["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|runs| {
                runs.as_array()
                    .unwrap()
                    .iter()
                    .map(|outputs| outputs.as_object().unwrap().iter().map(|(k, spec)| (k.clone(), read(spec))).collect())
                    .collect()
            })
            .collect()
    }
}
