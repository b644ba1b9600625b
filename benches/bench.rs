//! `make bench`: mkonnx against its peers, measured in the same run (these machines are
//! noisy, so every number is printed next to its peer and as a ratio). Results go to stdout
//! and `target/bench/results.md`. Needs `MKONNX_FIXTURES` (set by `make bench`).
//!
//! Every process gets one intra-op thread (`OMP_NUM_THREADS=1`, ONNX Runtime and libtorch
//! threads 1) unless the measurement is about jobs.

// The test helpers, for the moto_server (S3 API on loopback) the `remote` section shares
// results through.
#[path = "../tests/common/mod.rs"]
mod common;

use mkonnx::runtime::RgbImage;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(std::env::var_os("MKONNX_FIXTURES").expect("MKONNX_FIXTURES not set: run `make bench`"))
}

fn runs() -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("runs.json")).unwrap()).unwrap();
    v["runs"].as_array().unwrap().clone()
}

fn dataset() -> PathBuf {
    fixtures().join("datasets/triangles_dataset_small")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mkonnx_bin() -> PathBuf {
    repo().join("target/release/mkonnx")
}

fn python() -> PathBuf {
    repo().join(".venv/bin/python")
}

/// Wall time of a whole process (the best of `reps`), failing loudly if it fails.
fn time_process(cmd: &mut dyn FnMut() -> Command, reps: usize) -> (Duration, String) {
    let mut best = Duration::MAX;
    let mut out = String::new();
    for _ in 0..reps {
        settle();
        let mut c = cmd();
        c.env("OMP_NUM_THREADS", "1");
        let t = Instant::now();
        let o = c.output().expect("spawn");
        let d = t.elapsed();
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            eprintln!("  {:?}: {:.3} s", c.get_program(), d.as_secs_f64());
        }
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{:?} failed: {}{}", c, out, String::from_utf8_lossy(&o.stderr));
        best = best.min(d);
    }
    (best, out)
}

fn peer(args: &[&str]) -> Command {
    let mut c = Command::new(python());
    c.arg(repo().join("reference/bench_peers.py")).args(args);
    c
}

fn last_json(s: &str) -> Value {
    serde_json::from_str(s.lines().last().unwrap_or("{}")).unwrap_or(Value::Null)
}

fn copy_run(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest.join(".hydra")).unwrap();
    for file in ["best_model.pth", ".hydra/config.yaml"] {
        std::fs::copy(src.join(file), dest.join(file)).unwrap();
        written_an_hour_ago(&dest.join(file));
    }
}

/// Dates a file an hour back, as a run's files are when it is rebuilt. A file written within
/// the racy margin (100 ms with sub-second timestamps, else 2 s) is hashed again on every
/// build by design (git's racy-timestamp rule), which a benchmark that copies and then
/// immediately rebuilds would otherwise measure.
fn written_an_hour_ago(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)).unwrap();
}

/// Flushes dirty pages (the fixture copies a benchmark just made, the previous process's
/// outputs), so that the kernel's writeback does not land inside a timed process; called
/// before each one.
fn settle() {
    let _ = Command::new("sync").status();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo's bench discovery
    }
    // `make bench ONLY="convert noop"` (or `cargo bench --bench bench -- convert`) runs the
    // sections whose names contain one of the words: convert, ort, libtorch, coco, eval,
    // noop, fleet, jobs, remote, int8.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |section: &str| only.is_empty() || only.iter().any(|o| section.contains(o.as_str()));
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut md =
        vec!["# mkonnx benchmarks".to_string(), String::new(), "| what | mkonnx | peer | ratio |".into(), "|---|---|---|---|".into()];
    let mut row = |what: &str, ours: String, theirs: String, ratio: String| {
        println!("{what:<58} mkonnx {ours:>14}   peer {theirs:>14}   {ratio}");
        md.push(format!("| {what} | {ours} | {theirs} | {ratio} |"));
    };
    let sample = dataset().join("data/0000.png");
    let sample = if sample.is_file() { sample } else { std::fs::read_dir(dataset().join("data")).unwrap().next().unwrap().unwrap().path() };

    // 1. Conversion: whole process, mkonnx build (conversion only) vs Python torch.onnx.export.
    for run in runs().iter().filter(|r| ["mobilenet_v3_large_320_fpn", "resnet50_fpn"].contains(&r["name"].as_str().unwrap())) {
        let name = run["name"].as_str().unwrap();
        let src = fixtures().join(run["run_dir"].as_str().unwrap());
        let dir = t.join(format!("convert-{name}"));
        copy_run(&src, &dir);
        let out = t.join(format!("tv-{name}.onnx"));
        if wanted("convert") || wanted("ort") {
            // Alternating rounds (this machine's I/O speed drifts by 2x within a minute), the
            // best of five for each side; every round converts into a fresh store.
            let (mut ours, mut theirs) = (Duration::MAX, Duration::MAX);
            for i in 0..5 {
                let (d, _) = time_process(
                    &mut || {
                        let mut c = Command::new(mkonnx_bin());
                        c.args(["build", dir.to_str().unwrap(), "--image-input", sample.to_str().unwrap(), "--no-parity-check", "--quiet"])
                            .env("MKONNX_STORE", t.join(format!("store-convert-{name}-{i}")));
                        c
                    },
                    1,
                );
                ours = ours.min(d);
                let (d, _) =
                    time_process(&mut || peer(&["export", src.to_str().unwrap(), out.to_str().unwrap(), sample.to_str().unwrap()]), 1);
                theirs = theirs.min(d);
            }
            row(
                &format!("convert {name} (whole process)"),
                format!("{:.2} s", ours.as_secs_f64()),
                format!("{:.2} s", theirs.as_secs_f64()),
                format!("{:.1}x faster", theirs.as_secs_f64() / ours.as_secs_f64()),
            );
        }

        // 2. ONNX Runtime per image: our graph vs torchvision's exported graph, same harness.
        if wanted("ort") {
            let ours_model = dir.join("onnx_model/model.onnx");
            let n = "8";
            let per_image = |model: &Path| -> Vec<Option<f64>> {
                let (_, o) = time_process(&mut || peer(&["ort", model.to_str().unwrap(), dataset().to_str().unwrap(), n]), 1);
                last_json(&o)["ms"].as_array().map(|a| a.iter().map(Value::as_f64).collect()).unwrap_or_default()
            };
            let (ours, theirs) = (per_image(&ours_model), per_image(&out));
            // Compared on the images both graphs run (torchvision's fails on some).
            let both: Vec<(f64, f64)> = ours.iter().zip(&theirs).filter_map(|(a, b)| Some(((*a)?, (*b)?))).collect();
            let failed = theirs.iter().filter(|t| t.is_none()).count();
            let (ours_ms, theirs_ms) = (
                both.iter().map(|p| p.0).sum::<f64>() / both.len().max(1) as f64,
                both.iter().map(|p| p.1).sum::<f64>() / both.len().max(1) as f64,
            );
            row(
                &format!("ONNX Runtime ms/image {name}, ours vs torchvision export"),
                format!("{ours_ms:.1} ms"),
                if both.is_empty() { "failed".into() } else { format!("{theirs_ms:.1} ms") },
                if both.is_empty() {
                    format!("torchvision's graph failed on all {failed} images")
                } else {
                    format!(
                        "{:.2}x faster on {} images{}",
                        theirs_ms / ours_ms,
                        both.len(),
                        if failed > 0 { format!(" (torchvision's graph failed on {failed})") } else { String::new() }
                    )
                },
            );
        }
    }

    // 3. libtorch runner vs eager torchvision, images/s, 1 thread, every architecture, all
    // eval images; three alternating rounds, the best of each side (noisy shared cores).
    for run in runs().iter().filter(|_| wanted("libtorch")) {
        let name = run["name"].as_str().unwrap();
        let src = fixtures().join(run["run_dir"].as_str().unwrap());
        let images = std::fs::read_to_string(dataset().join("dataset.jsonl")).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
        let n = images.to_string();
        let mut runner = LibtorchBench::start(&src, images);
        let (mut ours_ips, mut eager_ips) = (0f64, 0f64);
        for _ in 0..3 {
            ours_ips = ours_ips.max(runner.images_per_second());
            let (_, e) = time_process(&mut || peer(&["eager", src.to_str().unwrap(), dataset().to_str().unwrap(), &n]), 1);
            eager_ips = eager_ips.max(last_json(&e)["images_per_s"].as_f64().unwrap_or(f64::NAN));
        }
        row(
            &format!("PyTorch model {name} images/s (libtorch vs eager)"),
            format!("{ours_ips:.2}/s"),
            format!("{eager_ips:.2}/s"),
            format!("{:.2}x", ours_ips / eager_ips),
        );
    }

    // 4. COCO evaluation: whole process, mkonnx coco-eval vs pycocotools.
    let gt = fixtures().join("coco/bench_gt.json");
    let dt = fixtures().join("coco/bench_dt.json");
    if gt.is_file() && wanted("coco") {
        let (ours, _) = time_process(
            &mut || {
                let mut c = Command::new(mkonnx_bin());
                c.args(["coco-eval", gt.to_str().unwrap(), dt.to_str().unwrap()]);
                c
            },
            3,
        );
        let (theirs, _) = time_process(&mut || peer(&["coco", gt.to_str().unwrap(), dt.to_str().unwrap()]), 1);
        row(
            "COCO eval, 5000 images / 218k detections (whole process)",
            format!("{:.2} s", ours.as_secs_f64()),
            format!("{:.2} s", theirs.as_secs_f64()),
            format!("{:.0}x faster", theirs.as_secs_f64() / ours.as_secs_f64()),
        );
    }

    // 5. ONNX evaluation of a run on the dataset vs the reference evaluation app (eager + pycocotools).
    let run = runs().into_iter().find(|r| r["name"] == "mobilenet_v3_large_320_fpn").unwrap();
    let src = fixtures().join(run["run_dir"].as_str().unwrap());
    let dir = t.join("eval-run");
    copy_run(&src, &dir);
    if wanted("eval") {
        let n_images =
            std::fs::read_to_string(dataset().join("dataset.jsonl")).unwrap().lines().filter(|l| !l.trim().is_empty()).count() as f64;
        let (_, _) = time_process(
            &mut || {
                let mut c = Command::new(mkonnx_bin());
                c.args(["build", dir.to_str().unwrap(), "--image-input", sample.to_str().unwrap(), "--no-parity-check", "--quiet"])
                    .env("MKONNX_STORE", t.join("store-eval"));
                c
            },
            1,
        );
        let (ours, _) = time_process(
            &mut || {
                let mut c = Command::new(mkonnx_bin());
                c.args([
                    "build",
                    dir.to_str().unwrap(),
                    "--dataset-dir",
                    dataset().to_str().unwrap(),
                    "--evaluate-converted-model",
                    "--no-parity-check",
                    "--quiet",
                    "--force",
                    "-j",
                    "1",
                ])
                .env("MKONNX_STORE", t.join("store-eval"));
                c
            },
            1,
        );
        let (theirs, _) = time_process(
            &mut || {
                let mut c = Command::new(python());
                c.arg(repo().join("reference/eval.py")).arg(&dir).arg(dataset()).args(["--vis", "8"]);
                c
            },
            1,
        );
        row(
            "evaluation images/s (mkonnx ONNX+PyTorch eval vs eval.py eager)",
            format!("{:.2}/s", n_images / ours.as_secs_f64()),
            format!("{:.2}/s", n_images / theirs.as_secs_f64()),
            format!("{:.2}x", theirs.as_secs_f64() / ours.as_secs_f64()),
        );
    }

    // 6. The engine: no-op rebuilds of 1 and 100 runs; 8 distinct runs with -j 2 vs -j 1.
    // The 100 runs share one checkpoint file through hard links (distinct paths, same
    // bytes): a no-op rebuild only stats them, and 7.5 GB of copies would leave the disk
    // busy writing back during the measurement.
    let many = t.join("many");
    let mut dirs = Vec::new();
    for i in 0..100 {
        let d = many.join(format!("run{i:03}"));
        std::fs::create_dir_all(d.join(".hydra")).unwrap();
        std::fs::hard_link(dir.join("best_model.pth"), d.join("best_model.pth")).unwrap();
        std::fs::copy(src.join(".hydra/config.yaml"), d.join(".hydra/config.yaml")).unwrap();
        written_an_hour_ago(&d.join(".hydra/config.yaml"));
        dirs.push(d.to_str().unwrap().to_string());
    }
    for count in [1usize, 100].into_iter().filter(|_| wanted("noop")) {
        let mut args: Vec<String> = vec!["build".into()];
        args.extend(dirs[..count].iter().cloned());
        args.extend(["--image-input", sample.to_str().unwrap(), "--no-parity-check", "--quiet"].map(String::from));
        let store = t.join(format!("store-noop-{count}"));
        let build = || {
            let mut c = Command::new(mkonnx_bin());
            c.args(&args).env("MKONNX_STORE", &store);
            c
        };
        time_process(&mut || build(), 1);
        let (noop, _) = time_process(&mut || build(), 5);
        row(
            &format!("no-op rebuild of {count} run(s) (whole process)"),
            format!("{:.1} ms", noop.as_secs_f64() * 1e3),
            format!("target {}", if count == 1 { "20 ms" } else { "200 ms" }),
            (if noop.as_millis() < if count == 1 { 20 } else { 200 } { "met" } else { "missed" }).into(),
        );
    }
    // 7. A fleet of 1,000 runs with nothing to do: the whole `mkonnx build` process (plan,
    // stat, store lookups, the fleet report) and `mkonnx report` over the same runs. The
    // runs are hard links of one run, outputs included (1,000 copies of a 76 MB model would
    // fill the disk); hard links share an inode, so the first build hashes each file once.
    if wanted("fleet") {
        let fleet = t.join("fleet");
        let store = t.join("store-fleet");
        let first = fleet.join("run0000");
        copy_run(&src, &first);
        let build_first = Command::new(mkonnx_bin())
            .args(["build", first.to_str().unwrap(), "--image-input", sample.to_str().unwrap(), "--quiet"])
            .env("MKONNX_STORE", &store)
            .env("OMP_NUM_THREADS", "1")
            .status()
            .unwrap();
        assert!(build_first.success());
        let files = ["best_model.pth", ".hydra/config.yaml", "onnx_model/model.onnx", "onnx_model/conversion_summary.txt"];
        let mut dirs = vec![first.to_str().unwrap().to_string()];
        for i in 1..1000 {
            let d = fleet.join(format!("run{i:04}"));
            for f in files {
                std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
                std::fs::hard_link(first.join(f), d.join(f)).unwrap();
            }
            dirs.push(d.to_str().unwrap().to_string());
        }
        let command = |verb: &str| {
            let mut c = Command::new(mkonnx_bin());
            c.arg(verb).args(&dirs).env("MKONNX_STORE", &store);
            if verb == "build" {
                c.args(["--image-input", sample.to_str().unwrap(), "--quiet"]);
            }
            c
        };
        time_process(&mut || command("build"), 1);
        for verb in ["build", "report"] {
            let (d, out) = time_process(&mut || command(verb), 5);
            assert!(out.contains("1000 of 1000 run(s) ok"), "{out}");
            row(
                &format!("fleet: 1,000 runs, mkonnx {verb} with nothing to do (whole process)"),
                format!("{:.1} ms", d.as_secs_f64() * 1e3),
                "target 300 ms".into(),
                (if d.as_millis() < 300 { "met" } else { "missed" }).into(),
            );
        }
    }
    let eight: Vec<String> = (0..8)
        .map(|i| {
            let d = t.join(format!("eight/run{i}"));
            copy_run(&src, &d);
            let cfg = d.join(".hydra/config.yaml");
            let text = std::fs::read_to_string(&cfg).unwrap();
            std::fs::write(&cfg, text.replacen("model:\n", &format!("model:\n  box_detections_per_img: {}\n", 90 + i), 1)).unwrap();
            d.to_str().unwrap().to_string()
        })
        .collect();
    let mut timings = Vec::new();
    for jobs in ["1", "2"].into_iter().filter(|_| wanted("jobs")) {
        let mut args: Vec<String> = vec!["build".into()];
        args.extend(eight.iter().cloned());
        args.extend(["--image-input", sample.to_str().unwrap(), "--quiet", "-j", jobs].map(String::from));
        let (d, _) = time_process(
            &mut || {
                let mut c = Command::new(mkonnx_bin());
                c.args(&args).env("MKONNX_STORE", t.join(format!("store-jobs-{jobs}")));
                c.env_remove("OMP_NUM_THREADS");
                c
            },
            1,
        );
        timings.push(d);
    }
    if timings.len() == 2 {
        row(
            "8 runs built (convert + parity), -j 2 vs -j 1",
            format!("{:.1} s", timings[1].as_secs_f64()),
            format!("{:.1} s", timings[0].as_secs_f64()),
            format!("{:.2}x faster", timings[0].as_secs_f64() / timings[1].as_secs_f64()),
        );
    }

    // 8. A shared remote store: 20 runs (distinct keys: each its own box_detections_per_img)
    // built on "machine A" (store A, conversion + parity) with a remote on moto_server, then
    // the same runs (copies at the same relative paths) on "machine B": an empty store B, the
    // same remote. Peers: A's time, and a plain download of every object under the remote's
    // prefix with boto3 (the same bytes through the same server, nothing verified or written
    // into a store).
    if wanted("remote") {
        let moto = common::moto::Moto::start(t);
        let url = moto.url("bench");
        let machine = |name: &str| -> Vec<String> {
            (0..20)
                .map(|i| {
                    let d = t.join(format!("remote-{name}/outputs/run{i:02}"));
                    copy_run(&src, &d);
                    let cfg = d.join(".hydra/config.yaml");
                    let text = std::fs::read_to_string(&cfg).unwrap();
                    std::fs::write(&cfg, text.replacen("model:\n", &format!("model:\n  box_detections_per_img: {}\n", 80 + i), 1)).unwrap();
                    written_an_hour_ago(&cfg);
                    d.to_str().unwrap().to_string()
                })
                .collect()
        };
        let (runs_a, runs_b, runs_c) = (machine("a"), machine("b"), machine("c"));
        let build_on = |runs: &[String], store: &str| {
            let mut c = Command::new(mkonnx_bin());
            c.arg("build").args(runs).args(["--image-input", sample.to_str().unwrap(), "--quiet", "--remote", &url]);
            if store.ends_with("-c") {
                // Downloads wait on the network, not the CPU: more jobs than cores. The keys
                // stay the same here (threads per stage = max(1, cpus / jobs) = 1 on 2 cores).
                c.args(["-j", "8"]);
            }
            c.env("MKONNX_STORE", t.join(store));
            moto.env(&mut c, &moto.rw);
            c
        };
        let (a, _) = time_process(&mut || build_on(&runs_a, "store-remote-a"), 1);
        let (b, _) = time_process(&mut || build_on(&runs_b, "store-remote-b"), 1);
        let (c8, _) = time_process(&mut || build_on(&runs_c, "store-remote-c"), 1);
        let copy_dir = t.join("remote-copy");
        let (copy, out) = time_process(
            &mut || {
                let mut c = Command::new(python());
                c.arg("-c")
                    .arg(
                        "import os, sys, boto3\n\
                         s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')\n\
                         n = 0\n\
                         for page in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[2], Prefix='bench/'):\n    \
                         for o in page.get('Contents', []):\n        \
                         dest = os.path.join(sys.argv[3], o['Key'])\n        \
                         os.makedirs(os.path.dirname(dest), exist_ok=True)\n        \
                         s3.download_file(sys.argv[2], o['Key'], dest)\n        \
                         n += o['Size']\n\
                         print(n)",
                    )
                    .args([&moto.endpoint, &moto.bucket, copy_dir.to_str().unwrap()]);
                moto.env(&mut c, &moto.rw);
                c
            },
            1,
        );
        let mb = out.trim().parse::<f64>().unwrap_or(0.0) / 1e6;
        // The same download path without moto's HTTP server (one Python process, the slowest
        // link above): store A pushed to a directory remote (`file://`), then machine D, with
        // an empty store, builds from it. This is mkonnx's own cost of a remote hit (listing,
        // size check, blake3, commit, materialization).
        let dir_remote = t.join("remote-dir");
        std::fs::create_dir_all(&dir_remote).unwrap();
        let dir_url = format!("file://{}", dir_remote.display());
        let on_dir = |sub: &str, runs: &[String], store: &str| {
            let mut c = Command::new(mkonnx_bin());
            c.arg(sub).args(runs).args(["--image-input", sample.to_str().unwrap(), "--quiet", "--remote", &dir_url]);
            c.env("MKONNX_STORE", t.join(store));
            c
        };
        let pushed = on_dir("push", &runs_a, "store-remote-a").output().expect("mkonnx push");
        assert!(pushed.status.success(), "mkonnx push to {dir_url}: {}", String::from_utf8_lossy(&pushed.stderr));
        let runs_d = machine("d");
        let (d, _) = time_process(&mut || on_dir("build", &runs_d, "store-remote-d"), 1);
        row(
            "remote: 20 runs on machine B (empty store) vs machine A",
            format!("{:.2} s", b.as_secs_f64()),
            format!("{:.2} s", a.as_secs_f64()),
            format!("{:.1}% of A (target < 15%)", 100.0 * b.as_secs_f64() / a.as_secs_f64()),
        );
        row(
            "remote: 20 runs on machine C (empty store, -j 8) vs machine A",
            format!("{:.2} s", c8.as_secs_f64()),
            format!("{:.2} s", a.as_secs_f64()),
            format!("{:.1}% of A (target < 15%)", 100.0 * c8.as_secs_f64() / a.as_secs_f64()),
        );
        row(
            "remote (file://): 20 runs on machine D (empty store) vs machine A",
            format!("{:.2} s", d.as_secs_f64()),
            format!("{:.2} s", a.as_secs_f64()),
            format!("{:.1}% of A (mkonnx's own cost, no HTTP server)", 100.0 * d.as_secs_f64() / a.as_secs_f64()),
        );
        row(
            &format!("remote: machine B vs downloading the same {mb:.0} MB (boto3)"),
            format!("{:.2} s", b.as_secs_f64()),
            format!("{:.2} s", copy.as_secs_f64()),
            format!("{:.2}x", b.as_secs_f64() / copy.as_secs_f64()),
        );
    }

    // 9. INT8 on the ResNet-50 fixture: mkonnx's INT8 model (default 64 calibration images,
    // min-max) against the float32 model in ONNX Runtime (default optimizations, the same
    // images and thread count, measured by the evaluations' latency protocol), and against
    // `onnxruntime.quantization.quantize_static` (QDQ, per channel, the same float32 model
    // and calibration images; benches/int8_peer.py): AP and ms/image side by side.
    if wanted("int8") {
        int8_section(t, &mut row);
    }

    let out = repo().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.md"), md.join("\n") + "\n").unwrap();
    println!("\nwritten to {}", out.join("results.md").display());
}

/// The `int8` section (see its comment in `main`).
fn int8_section(t: &Path, row: &mut dyn FnMut(&str, String, String, String)) {
    let run = runs().into_iter().find(|r| r["name"] == "resnet50_fpn").unwrap();
    let src = fixtures().join(run["run_dir"].as_str().unwrap());
    let dir = t.join("int8-run");
    copy_run(&src, &dir);
    // The reference eval app's own evaluation is the PyTorch side: libtorch does not run.
    let user_eval = fixtures().join(run["eval_dir"].as_str().unwrap());
    let user_eval_copy = dir.join(user_eval.file_name().unwrap());
    std::fs::create_dir_all(&user_eval_copy).unwrap();
    for e in std::fs::read_dir(&user_eval).unwrap().map(|e| e.unwrap()).filter(|e| e.path().is_file()) {
        std::fs::copy(e.path(), user_eval_copy.join(e.file_name())).unwrap();
    }
    // As many jobs as CPUs: one intra-op thread per stage.
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string();
    let (build, _) = time_process(
        &mut || {
            let mut c = Command::new(mkonnx_bin());
            c.args(["build", dir.to_str().unwrap(), "--dataset-dir", dataset().to_str().unwrap(), "--evaluate-converted-model"])
                .args(["--quantize", "int8", "--no-parity-check", "--visualizations", "0", "--quiet", "-j", &cpus])
                .env("MKONNX_STORE", t.join("store-int8"));
            c
        },
        1,
    );
    let cmp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("onnx_model/comparison.json")).unwrap()).unwrap();
    let ms = |model: &str| cmp["latency"][model]["median_ms"].as_f64().unwrap_or(f64::NAN);
    let threads = cmp["latency"]["int8"]["threads"].as_u64().unwrap_or(1).to_string();
    let (float_ap, int8_ap) = (cmp["onnx"]["AP"].as_f64().unwrap(), cmp["int8"]["headline"]["AP"].as_f64().unwrap());
    println!("  (mkonnx build with --quantize int8 and evaluation of float32 and INT8: {:.0} s)", build.as_secs_f64());
    row(
        &format!("INT8 vs float32 ms/image resnet50_fpn (ORT, {threads} thread; in mkonnx's evaluations)"),
        format!("{:.1} ms", ms("int8")),
        format!("{:.1} ms", ms("onnx")),
        format!("{:.2}x faster (target 1.5x)", ms("onnx") / ms("int8")),
    );
    row(
        "INT8 vs float32 AP resnet50_fpn (mkonnx, default calibration: min-max, up to 64 images)",
        format!("{int8_ap:.4}"),
        format!("{float_ap:.4}"),
        format!("{:+.4}", int8_ap - float_ap),
    );

    let ds_name = dataset().file_name().unwrap().to_string_lossy().into_owned();
    let gt = dir.join(format!("eval_{ds_name}_model_onnx/ground_truth_coco.json"));
    let peer_dir = t.join("int8-peer");
    let (_, out) = time_process(
        &mut || {
            let mut c = Command::new(python());
            c.arg(repo().join("benches/int8_peer.py"))
                .arg(dir.join("onnx_model/model.onnx"))
                .arg(dataset())
                .arg(&gt)
                .arg(mkonnx::stages::quantize::DEFAULT_CALIBRATION_IMAGES.to_string())
                .arg(&threads)
                .arg(&peer_dir)
                .arg(dir.join("onnx_model/model.int8.onnx"));
            c
        },
        1,
    );
    let peer = last_json(&out);
    let peer_ms = |model: &str| peer["ms"][model][0].as_f64().unwrap_or(f64::NAN);
    let peer_ap = peer["ap"]["quantize_static"]["AP"].as_f64().unwrap_or(f64::NAN);
    row(
        &format!("INT8 vs float32 ms/image resnet50_fpn (ORT, {threads} thread; one Python process)"),
        format!("{:.1} ms", peer_ms("mkonnx_int8")),
        format!("{:.1} ms", peer_ms("float32")),
        format!("{:.2}x faster", peer_ms("float32") / peer_ms("mkonnx_int8")),
    );
    row(
        "INT8 ms/image resnet50_fpn, mkonnx vs quantize_static (QDQ, per channel)",
        format!("{:.1} ms", peer_ms("mkonnx_int8")),
        format!("{:.1} ms", peer_ms("quantize_static")),
        format!("{:.2}x faster", peer_ms("quantize_static") / peer_ms("mkonnx_int8")),
    );
    row(
        "INT8 AP resnet50_fpn, mkonnx vs quantize_static (same calibration images)",
        format!("{int8_ap:.4}"),
        format!("{peer_ap:.4}"),
        format!("{:+.4} (float32 {float_ap:.4})", int8_ap - peer_ap),
    );
}

/// Our libtorch runner as the stages use it: the `mkonnx-torch` process, images sent over
/// its pipe one at a time, one thread, warmed up on the first image.
struct LibtorchBench {
    runner: mkonnx::runtime::pytorch::PytorchRunner,
    images: Vec<mkonnx::runtime::ImageBatch>,
}

impl LibtorchBench {
    fn start(run_dir: &Path, n: usize) -> LibtorchBench {
        use mkonnx::data::run_dir::RunDir;
        use mkonnx::runtime::pytorch::{Device, PytorchRunner, RunnerSetup};
        let run = RunDir::locate(run_dir, None).unwrap();
        let det = mkonnx::model::Detector::load_run(&run).unwrap();
        let setup = RunnerSetup { checkpoint: run.checkpoint, arch: det.arch, params: det.params, device: Device::Cpu, threads: 1 };
        let mut runner = PytorchRunner::start(&setup).unwrap();
        let ds = mkonnx::data::dataset::Dataset::load(&dataset()).unwrap();
        let images: Vec<_> = ds.images.iter().take(n).map(|i| RgbImage::load(&ds.image_path(i)).unwrap().to_batch()).collect();
        runner.detect(&images[0]).unwrap();
        LibtorchBench { runner, images }
    }

    fn images_per_second(&mut self) -> f64 {
        let t = Instant::now();
        for img in &self.images {
            self.runner.detect(img).unwrap();
        }
        self.images.len() as f64 / t.elapsed().as_secs_f64()
    }
}
