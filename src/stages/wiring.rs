//! Typed stage wiring: what each stage makes, and what it reads.
//!
//! Every stage makes one kind of result (a [`Product`]: a few files, named here once), and
//! reads its upstream results through typed fields (`Upstream<OnnxModel>`, an `Option` for an
//! input the planner may leave out). The planner builds each stage value from the nodes it
//! planned before ([`add`] returns a `Planned<P>` for the stage's product), so an input can
//! only be connected to a node that makes what the input reads, and a stage knows which
//! inputs it has from its own fields: it never probes input names. The engine sees the
//! inputs through [`crate::engine::Stage::inputs`], under their names (part of the key).
//!
//! A new stage: a struct with its parameters and `Upstream<_>` fields, `impl Stage` (with
//! `inputs` listing the fields) and `impl Produces`; a `Product` if it makes a new kind of
//! result; one [`add`] call in the planner ([`super::plan`]).

use std::marker::PhantomData;
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

use super::convert::ModelInfo;
use super::evaluate::{DatasetInfo, MetricsFile};
use super::parity::ParityReport;
use super::quantize::{Calibration, QuantizationReport};
use crate::engine::{Graph, Hash, NodeHandle, NodeSpec, Stage, StageContext};
use crate::eval::compare::Headline;

/// A kind of stage result.
pub trait Product {
    /// What it is, for messages.
    const WHAT: &'static str;
}

/// A stage that makes a `Product`.
pub trait Produces: Stage {
    /// What its result is.
    type Product: Product;
}

/// A node of the graph whose result is a `P`.
pub struct Planned<P> {
    handle: NodeHandle,
    product: PhantomData<fn() -> P>,
}

impl<P> Clone for Planned<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Planned<P> {}

impl<P> Planned<P> {
    /// The engine's handle of the node (reports, status).
    pub fn handle(self) -> NodeHandle {
        self.handle
    }

    /// This node as the input `name` of a stage.
    pub fn as_input(self, name: &'static str) -> Upstream<P> {
        Upstream { name, node: self }
    }
}

/// Adds `stage`, with the labels, files and materializations `spec` gives it, and returns
/// its node, typed by what it makes. Its node inputs are its `Upstream` fields.
pub fn add<S: Produces + 'static>(
    g: &mut Graph,
    stage: S,
    spec: impl FnOnce(NodeSpec) -> NodeSpec,
) -> Result<Planned<S::Product>, crate::engine::EngineError> {
    let handle = g.add(spec(NodeSpec::new(stage)))?;
    Ok(Planned { handle, product: PhantomData })
}

/// One input of a stage: the upstream node, under the name the key knows it by.
pub struct Upstream<P> {
    name: &'static str,
    node: Planned<P>,
}

impl<P> Clone for Upstream<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Upstream<P> {}

impl<P: Product> Upstream<P> {
    /// `(name, node)`, for [`Stage::inputs`].
    pub fn wire(&self) -> (&'static str, NodeHandle) {
        (self.name, self.node.handle)
    }

    /// The path of artifact `file` in the store (read-only).
    fn path(&self, ctx: &StageContext<'_>, file: &str) -> anyhow::Result<PathBuf> {
        Ok(ctx.input_artifact(self.name, file)?)
    }

    /// The bytes of artifact `file`.
    fn bytes(&self, ctx: &StageContext<'_>, file: &str) -> anyhow::Result<Vec<u8>> {
        Ok(ctx.read_input_artifact(self.name, file)?)
    }

    /// Artifact `file`, parsed as JSON.
    fn json<T: for<'de> Deserialize<'de>>(&self, ctx: &StageContext<'_>, file: &str) -> anyhow::Result<T> {
        serde_json::from_slice(&self.bytes(ctx, file)?).with_context(|| format!("corrupt artifact {file} of {} ({})", self.name, P::WHAT))
    }
}

/// `resolve_model`'s result: `model.json`, the detector's description.
pub struct ResolvedModel;

impl Product for ResolvedModel {
    const WHAT: &'static str = "resolved model";
}

impl ResolvedModel {
    /// The description file.
    pub const FILE: &'static str = "model.json";
}

impl Upstream<ResolvedModel> {
    /// The detector's description.
    pub fn info(&self, ctx: &StageContext<'_>) -> anyhow::Result<ModelInfo> {
        self.json(ctx, ResolvedModel::FILE)
    }
}

/// `export_onnx`'s result: `model.onnx`.
pub struct OnnxModel;

impl Product for OnnxModel {
    const WHAT: &'static str = "ONNX model";
}

impl OnnxModel {
    /// The model file.
    pub const FILE: &'static str = "model.onnx";
}

impl Upstream<OnnxModel> {
    /// The model file in the store.
    pub fn model(&self, ctx: &StageContext<'_>) -> anyhow::Result<PathBuf> {
        self.path(ctx, OnnxModel::FILE)
    }

    /// The model's content hash.
    pub fn model_hash(&self, ctx: &StageContext<'_>) -> anyhow::Result<Hash> {
        Ok(ctx.input_artifact_hash(self.name, OnnxModel::FILE)?)
    }
}

/// `parity_check`'s result: `parity.json`.
pub struct Parity;

impl Product for Parity {
    const WHAT: &'static str = "parity check";
}

impl Parity {
    /// The report file.
    pub const FILE: &'static str = "parity.json";
}

impl Upstream<Parity> {
    /// The parity report.
    pub fn report(&self, ctx: &StageContext<'_>) -> anyhow::Result<ParityReport> {
        self.json(ctx, Parity::FILE)
    }
}

/// A published model (`publish_model`, `publish_int8`): the model file, under its own name.
pub struct Published;

impl Product for Published {
    const WHAT: &'static str = "published model";
}

/// `conversion_summary`'s result: `conversion_summary.txt`.
pub struct Summary;

impl Product for Summary {
    const WHAT: &'static str = "conversion summary";
}

impl Summary {
    /// The summary file.
    pub const FILE: &'static str = "conversion_summary.txt";
}

/// `ground_truth`'s result: the dataset's COCO ground truth and facts about the dataset.
pub struct GroundTruthSet;

impl Product for GroundTruthSet {
    const WHAT: &'static str = "ground truth";
}

impl GroundTruthSet {
    /// The COCO ground truth (also in every evaluation's directory).
    pub const COCO: &'static str = "ground_truth_coco.json";
    /// Name, hash and size of the dataset.
    pub const DATASET: &'static str = "dataset.json";
}

impl Upstream<GroundTruthSet> {
    /// The COCO ground truth's bytes.
    pub fn coco_bytes(&self, ctx: &StageContext<'_>) -> anyhow::Result<Vec<u8>> {
        self.bytes(ctx, GroundTruthSet::COCO)
    }

    /// Name, hash and size of the dataset.
    pub fn dataset(&self, ctx: &StageContext<'_>) -> anyhow::Result<DatasetInfo> {
        self.json(ctx, GroundTruthSet::DATASET)
    }
}

/// Which model an evaluation ran: its files are `<PREFIX>_metrics.json` and
/// `<PREFIX>_predictions.json`, beside the ground truth and `visualizations/`.
pub trait EvaluatedModel {
    /// `onnx`, `pytorch` or `int8`.
    const PREFIX: &'static str;
}

/// An evaluation's result (`evaluate_onnx`, `evaluate_pytorch`, `evaluate_int8`).
pub struct Evaluation<M>(PhantomData<M>);

/// The float32 ONNX model.
pub struct OnnxSide;
/// The PyTorch model (libtorch).
pub struct PytorchSide;
/// The INT8 ONNX model.
pub struct Int8Side;

impl EvaluatedModel for OnnxSide {
    const PREFIX: &'static str = "onnx";
}
impl EvaluatedModel for PytorchSide {
    const PREFIX: &'static str = "pytorch";
}
impl EvaluatedModel for Int8Side {
    const PREFIX: &'static str = "int8";
}

impl<M: EvaluatedModel> Product for Evaluation<M> {
    const WHAT: &'static str = "evaluation";
}

impl<M: EvaluatedModel> Evaluation<M> {
    /// The metrics file's name.
    pub fn metrics_file() -> String {
        format!("{}_metrics.json", M::PREFIX)
    }

    /// The predictions file's name.
    pub fn predictions_file() -> String {
        format!("{}_predictions.json", M::PREFIX)
    }
}

impl<M: EvaluatedModel> Upstream<Evaluation<M>> {
    /// The metrics (COCO, dataset, latency).
    pub fn metrics(&self, ctx: &StageContext<'_>) -> anyhow::Result<MetricsFile> {
        self.json(ctx, &Evaluation::<M>::metrics_file())
    }

    /// The ground truth it was scored against.
    pub fn ground_truth_bytes(&self, ctx: &StageContext<'_>) -> anyhow::Result<Vec<u8>> {
        self.bytes(ctx, GroundTruthSet::COCO)
    }
}

/// `pytorch_metrics_from_user`'s result: `headline.json`, the user's metrics normalized.
pub struct UserMetrics;

impl Product for UserMetrics {
    const WHAT: &'static str = "user's PyTorch metrics";
}

impl UserMetrics {
    /// The headline file.
    pub const FILE: &'static str = "headline.json";
}

impl Upstream<UserMetrics> {
    /// The user's headline metrics.
    pub fn headline(&self, ctx: &StageContext<'_>) -> anyhow::Result<Headline> {
        self.json(ctx, UserMetrics::FILE)
    }
}

/// `compare`'s result: `comparison.json`.
pub struct ComparisonFile;

impl Product for ComparisonFile {
    const WHAT: &'static str = "comparison";
}

impl ComparisonFile {
    /// The comparison file.
    pub const FILE: &'static str = "comparison.json";
}

/// `calibrate`'s result: `calibration.json`, the activation ranges.
pub struct CalibrationRanges;

impl Product for CalibrationRanges {
    const WHAT: &'static str = "calibration";
}

impl CalibrationRanges {
    /// The ranges file.
    pub const FILE: &'static str = "calibration.json";
}

impl Upstream<CalibrationRanges> {
    /// The calibration.
    pub fn calibration(&self, ctx: &StageContext<'_>) -> anyhow::Result<Calibration> {
        self.json(ctx, CalibrationRanges::FILE)
    }
}

/// `quantize`'s result: `model.int8.onnx` and `quantization.json`.
pub struct Int8Model;

impl Product for Int8Model {
    const WHAT: &'static str = "INT8 model";
}

impl Int8Model {
    /// The model file.
    pub const FILE: &'static str = "model.int8.onnx";
    /// How it was made.
    pub const REPORT: &'static str = "quantization.json";
}

impl Upstream<Int8Model> {
    /// The model file in the store.
    pub fn model(&self, ctx: &StageContext<'_>) -> anyhow::Result<PathBuf> {
        self.path(ctx, Int8Model::FILE)
    }

    /// How it was made.
    pub fn report(&self, ctx: &StageContext<'_>) -> anyhow::Result<QuantizationReport> {
        self.json(ctx, Int8Model::REPORT)
    }
}

/// A model a publish stage can put in the run directory: its file name.
pub trait PublishableModel: Product + 'static {
    /// The file, in the producer's result and in `onnx_model/`.
    const MODEL_FILE: &'static str;
    /// The name of the stage that publishes it.
    const PUBLISH_STAGE: &'static str;
}

impl PublishableModel for OnnxModel {
    const MODEL_FILE: &'static str = OnnxModel::FILE;
    const PUBLISH_STAGE: &'static str = "publish_model";
}

impl PublishableModel for Int8Model {
    const MODEL_FILE: &'static str = Int8Model::FILE;
    const PUBLISH_STAGE: &'static str = "publish_int8";
}

impl<P: PublishableModel> Upstream<P> {
    /// Declares the model as the running stage's output, as it is (no copy).
    pub fn reuse_model(&self, ctx: &mut StageContext<'_>) -> anyhow::Result<()> {
        ctx.reuse_input_artifact(self.name, P::MODEL_FILE, P::MODEL_FILE)?;
        Ok(())
    }
}
