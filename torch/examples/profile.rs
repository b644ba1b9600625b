//! Where the libtorch runner spends its time, phase by phase, on a run and a dataset:
//!
//! ```text
//! MKONNX_TORCH_PROFILE=1 OMP_NUM_THREADS=1 \
//!   cargo run --release -p mkonnx-torch --example profile -- RUN_DIR DATASET_DIR [IMAGES]
//! ```
//! One image per call, one libtorch thread, after one warm-up call; prints each call's phases
//! and the mean wall time per image (compare with eager PyTorch on the same images).

use mkonnx::data::dataset::Dataset;
use mkonnx::data::run_dir::RunDir;
use mkonnx::runtime::RgbImage;
use std::path::Path;

fn main() -> anyhow::Result<()> {
    mkonnx_torch::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [run, dataset, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: profile RUN_DIR DATASET_DIR [IMAGES]");
    };
    let n: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(8);
    let detector = mkonnx::model::Detector::load_run(&RunDir::locate(Path::new(run), None)?)?;
    mkonnx_torch::set_num_threads(1);
    let torch = mkonnx_torch::TorchDetector::new(&detector, tch::Device::Cpu)?;
    let ds = Dataset::load(std::path::Path::new(dataset))?;
    let images: Vec<tch::Tensor> = ds
        .images
        .iter()
        .take(n)
        .map(|i| {
            let img = RgbImage::load(&ds.image_path(i))?;
            Ok(mkonnx_torch::image_from_chw(img.height, img.width, &img.chw)?)
        })
        .collect::<anyhow::Result<_>>()?;
    torch.detect(std::slice::from_ref(&images[0]))?;
    let start = std::time::Instant::now();
    for img in &images {
        torch.detect(std::slice::from_ref(img))?;
    }
    println!("{} {:.1} ms/image", detector.arch, start.elapsed().as_secs_f64() * 1e3 / images.len() as f64);
    Ok(())
}
