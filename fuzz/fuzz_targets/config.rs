//! The Hydra config interpreter and the model resolver: the input is `.hydra/config.yaml`
//! text, resolved against the tensor names of each architecture family (one-element
//! synthetic weights: the resolver reads names and the class count, never values).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mkonnx::data::hydra::TrainingConfig;
use mkonnx::model::resolve::resolve;
use mkonnx::model::{WeightTensor, Weights};
use std::path::Path;
use std::sync::OnceLock;

/// Tensor names that identify ResNet-50, ResNet-50 v2 and MobileNetV3 FasterRCNNs.
const FAMILIES: [&[&str]; 3] = [
    &["backbone.body.layer1.0.conv1.weight"],
    &["backbone.body.layer1.0.conv1.weight", "roi_heads.box_head.0.0.weight"],
    &["backbone.body.0.0.weight", "backbone.body.1.block.0.0.weight"],
];

fn weight_sets() -> &'static [Weights] {
    static SETS: OnceLock<Vec<Weights>> = OnceLock::new();
    SETS.get_or_init(|| {
        FAMILIES
            .iter()
            .map(|names| {
                let one = || WeightTensor { shape: vec![1], data: vec![0.0] };
                let mut tensors: Vec<(String, WeightTensor)> = names.iter().map(|n| (n.to_string(), one())).collect();
                tensors.push(("roi_heads.box_predictor.cls_score.weight".into(), WeightTensor { shape: vec![3, 2], data: vec![0.0; 6] }));
                Weights::new(tensors)
            })
            .collect()
    })
}

fuzz_target!(|text: &[u8]| {
    let Ok(text) = std::str::from_utf8(text) else { return };
    let path = Path::new("fuzz/.hydra/config.yaml");
    let Ok(config) = TrainingConfig::parse(text, path) else { return };
    for weights in weight_sets() {
        let _ = resolve(&config, weights, Path::new("fuzz/best_model.pth"));
    }
});
