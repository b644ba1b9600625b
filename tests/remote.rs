//! The remote store against a real S3 API (moto_server on loopback, IAM enforced): two
//! machines share results byte for byte, a process killed between its blob and record
//! uploads, two concurrent builds of one key, damaged and deleted remote blobs, read-only
//! credentials, a dead endpoint, a format marker of another version; and `--shard`
//! partitioning runs (`mkonnx plan`).

mod common;
use common::moto::{free_port, Credentials, Moto};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RUN: &str = "mobilenet_v3_large_320_fpn";

/// One "machine": its own store and its own copy of the run.
struct Machine {
    store: PathBuf,
    run: PathBuf,
}

fn machine(root: &Path, name: &str) -> Machine {
    let run = copy_run(RUN, &root.join(name).join("run"), false);
    Machine { store: root.join(name).join("store"), run }
}

/// `mkonnx build` of the machine's run (conversion only unless `extra` says more), against
/// remote `url` with `creds`; returns the process output and its `--json`.
fn build(m: &Machine, moto: &Moto, creds: &Credentials, url: &str, extra: &[&str]) -> (Output, Value) {
    build_with(m, moto, creds, url, extra, &[])
}

fn build_command(m: &Machine, moto: &Moto, creds: &Credentials, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let ds = eval_dataset();
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &m.store);
    moto.env(&mut cmd, creds);
    cmd.args(["build", m.run.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "-j", "1", "--remote", url]);
    cmd.args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn build_with(m: &Machine, moto: &Moto, creds: &Credentials, url: &str, extra: &[&str], env: &[(&str, &str)]) -> (Output, Value) {
    let o = build_command(m, moto, creds, url, extra, env).arg("--json").output().expect("run mkonnx");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (o, v)
}

fn ok(o: &Output) {
    assert!(o.status.success(), "mkonnx failed: {}", text(o));
}

/// Stages that ran (`built`) in a `--json` output.
fn built(v: &Value) -> Vec<String> {
    let mut stages: Vec<String> = v["runs"][0]["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no stages in {v:#}"))
        .iter()
        .filter(|s| s["outcome"] == "built")
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect();
    stages.sort();
    stages
}

fn stat(v: &Value, counter: &str) -> u64 {
    v["remote"][counter].as_u64().unwrap_or_else(|| panic!("no remote.{counter} in {v:#}"))
}

/// Every file under `dir` (relative path -> blake3), the run's inputs included.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, mkonnx::engine::hash_file(&p).unwrap().to_hex());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The remote object name of the blob holding file `path`'s bytes.
fn blob_key(prefix: &str, path: &Path) -> String {
    let hex = mkonnx::engine::hash_file(path).unwrap().to_hex();
    format!("{prefix}/blobs/{}/{}", &hex[..2], &hex[2..])
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn a_second_machine_downloads_instead_of_building_and_gets_identical_bytes() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let url = moto.url("team/cache");
    let (a, b) = (machine(t.path(), "a"), machine(t.path(), "b"));
    let eval = ["--evaluate-converted-model"];

    let (o, first) = build(&a, &moto, &moto.rw, &url, &eval);
    ok(&o);
    assert_eq!(built(&first).len(), 9, "{first:#}");
    assert_eq!((stat(&first, "hits"), stat(&first, "misses"), stat(&first, "uploads")), (0, 9, 9), "{first:#}");
    let keys = moto.keys("team/cache/");
    assert!(keys.contains(&"team/cache/mkonnx-remote.json".to_string()), "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.starts_with("team/cache/records/")).count(), 9, "{keys:?}");

    // Machine B: an empty store, the same remote. Nothing runs; every output is downloaded,
    // verified and byte-identical to A's.
    let (o, second) = build(&b, &moto, &moto.rw, &url, &eval);
    ok(&o);
    assert!(built(&second).is_empty(), "{second:#}");
    assert_eq!((stat(&second, "hits"), stat(&second, "misses"), stat(&second, "uploads")), (9, 0, 0), "{second:#}");
    assert_eq!(stat(&second, "errors"), 0);
    assert_eq!(tree(&a.run), tree(&b.run));
    assert_eq!(first["runs"][0]["comparison"], second["runs"][0]["comparison"]);
    assert!(!text(&o).contains("warning"), "{}", text(&o));

    // The summary line names the remote and its counters (without --json).
    let mut cmd = build_command(&b, &moto, &moto.rw, &url, &eval, &[]);
    cmd.args(["--quiet"]);
    let plain = cmd.output().unwrap();
    ok(&plain);
    assert!(text(&plain).contains(&format!("remote {url} (read-write): 0 hit(s), 0 miss(es), 0 upload(s)")), "{}", text(&plain));
}

#[test]
fn push_and_pull_share_a_local_build() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let url = moto.url("pushed");
    let (a, b) = (machine(t.path(), "a"), machine(t.path(), "b"));
    let ds = eval_dataset();
    let args = |m: &Machine, cmd: &str| {
        vec![
            cmd.to_string(),
            m.run.display().to_string(),
            "--dataset-dir".into(),
            ds.display().to_string(),
            "--no-parity-check".into(),
            "--json".into(),
            "--remote".into(),
            url.clone(),
        ]
    };

    // Nothing built anywhere yet: pull fails, runs nothing, and says why.
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &b.store);
    let o = moto.env(&mut cmd, &moto.rw).args(args(&b, "pull")).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("neither the local store nor the remote"), "{}", text(&o));
    assert!(!b.run.join("onnx_model/model.onnx").exists());

    // A builds without the remote, then pushes what its store has.
    let o = mkonnx(&["build", a.run.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "--no-parity-check", "-q"], &a.store);
    ok(&o);
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &a.store);
    let o = moto.env(&mut cmd, &moto.rw).args(args(&a, "push")).output().unwrap();
    ok(&o);
    let pushed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(built(&pushed).is_empty(), "{pushed:#}");
    assert_eq!(stat(&pushed, "uploads"), 4, "{pushed:#}");

    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &b.store);
    let o = moto.env(&mut cmd, &moto.rw).args(args(&b, "pull")).output().unwrap();
    ok(&o);
    let pulled: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stat(&pulled, "hits"), 4, "{pulled:#}");
    assert_eq!(tree(&a.run), tree(&b.run));
}

#[test]
fn a_process_killed_between_blob_and_record_uploads_leaves_no_record() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let url = moto.url("killed");
    let (a, b, c) = (machine(t.path(), "a"), machine(t.path(), "b"), machine(t.path(), "c"));

    let (o, _) = build_with(&a, &moto, &moto.rw, &url, &["--no-parity-check"], &[(mkonnx::engine::TEST_HOOK_BEFORE_RECORD, "exit")]);
    assert_eq!(o.status.code(), Some(86), "{}", text(&o));
    // The first stage's blob is there, its record is not: no machine may take it as a result.
    let keys = moto.keys("killed/");
    assert!(keys.iter().any(|k| k.starts_with("killed/blobs/")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.starts_with("killed/records/")), "{keys:?}");

    // B misses everything, builds, skips the blob already uploaded, records every stage.
    let (o, v) = build(&b, &moto, &moto.rw, &url, &["--no-parity-check"]);
    ok(&o);
    assert_eq!(built(&v), ["conversion_summary", "export_onnx", "publish_model", "resolve_model"], "{v:#}");
    assert_eq!((stat(&v, "misses"), stat(&v, "uploads")), (4, 4), "{v:#}");
    let blobs_now = moto.keys("killed/blobs/").len() as u64;
    assert_eq!(stat(&v, "blobs_uploaded"), blobs_now - 1, "the killed process's blob is reused: {v:#}");

    // A rerun of the killed machine and a third machine find everything.
    for m in [&a, &c] {
        let (o, v) = build(m, &moto, &moto.rw, &url, &["--no-parity-check"]);
        ok(&o);
        assert_eq!(stat(&v, "uploads"), 0, "{v:#}");
        assert_eq!(tree(&m.run.join("onnx_model")), tree(&b.run.join("onnx_model")));
    }
}

#[test]
fn concurrent_builds_of_one_key_record_it_once() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let url = moto.url("race");
    let (a, b) = (machine(t.path(), "a"), machine(t.path(), "b"));
    // Each record upload waits 3 s, so both processes miss and build each key, then race.
    let hook = [(mkonnx::engine::TEST_HOOK_BEFORE_RECORD, "sleep:3000")];
    let children: Vec<_> = [&a, &b]
        .iter()
        .map(|m| {
            build_command(m, &moto, &moto.rw, &url, &["--no-parity-check", "--json"], &hook)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let v: Vec<Value> = outputs
        .iter()
        .map(|o| {
            ok(o);
            serde_json::from_slice(&o.stdout).unwrap()
        })
        .collect();
    let sum = |c: &str| stat(&v[0], c) + stat(&v[1], c);
    // Every key is recorded exactly once; the other process lost the race or downloaded.
    assert_eq!(sum("uploads"), 4, "{v:#?}");
    assert_eq!(sum("races_lost") + sum("hits"), 4, "{v:#?}");
    assert!(sum("races_lost") >= 1, "the processes did not overlap: {v:#?}");
    assert_eq!(moto.keys("race/records/").len(), 4);
    assert_eq!(tree(&a.run.join("onnx_model")), tree(&b.run.join("onnx_model")));
    // Whoever comes next downloads the one recorded result.
    let c = machine(t.path(), "c");
    let (o, w) = build(&c, &moto, &moto.rw, &url, &["--no-parity-check"]);
    ok(&o);
    assert_eq!(stat(&w, "hits"), 4, "{w:#}");
}

#[test]
fn damaged_and_deleted_remote_blobs_are_detected_rebuilt_and_repaired() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let url = moto.url("repair");
    let (a, b, c) = (machine(t.path(), "a"), machine(t.path(), "b"), machine(t.path(), "c"));
    let (o, _) = build(&a, &moto, &moto.rw, &url, &["--no-parity-check"]);
    ok(&o);

    // The model's blob: same size, one byte changed. The summary's blob: deleted.
    let model = a.run.join("onnx_model/model.onnx");
    let model_key = blob_key("repair", &model);
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[1000] ^= 0xff;
    let damaged = t.path().join("damaged.onnx");
    std::fs::write(&damaged, &bytes).unwrap();
    moto.put_file(&model_key, &damaged);
    let summary_key = blob_key("repair", &a.run.join("onnx_model/conversion_summary.txt"));
    moto.delete(&summary_key);

    let (o, v) = build(&b, &moto, &moto.rw, &url, &["--no-parity-check"]);
    ok(&o);
    let log = text(&o);
    assert!(log.contains(&model_key) && log.contains("do not hash"), "{log}");
    assert!(log.contains(&summary_key) && log.contains("missing"), "{log}");
    assert_eq!(built(&v), ["conversion_summary", "export_onnx"], "{v:#}");
    assert_eq!(stat(&v, "hits"), 2, "resolve_model and publish_model (whose blob export repaired): {v:#}");
    assert!(stat(&v, "errors") >= 2, "{v:#}");
    assert_eq!(tree(&a.run.join("onnx_model")), tree(&b.run.join("onnx_model")));
    // The remote has the right bytes again.
    let fetched = t.path().join("fetched.onnx");
    moto.get_file(&model_key, &fetched);
    assert_eq!(std::fs::read(&fetched).unwrap(), std::fs::read(&model).unwrap());
    assert!(moto.keys(&summary_key).contains(&summary_key));

    let (o, v) = build(&c, &moto, &moto.rw, &url, &["--no-parity-check"]);
    ok(&o);
    assert_eq!((stat(&v, "hits"), stat(&v, "errors")), (4, 0), "{v:#}");
    assert_eq!(tree(&a.run.join("onnx_model")), tree(&c.run.join("onnx_model")));
}

#[test]
fn read_only_credentials_build_locally_upload_nothing_and_warn_once() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let url = moto.url("shared");
    let (a, b) = (machine(t.path(), "a"), machine(t.path(), "b"));
    let (o, _) = build(&a, &moto, &moto.rw, &url, &["--no-parity-check"]);
    ok(&o);
    let before = moto.keys("shared/");

    // B reads what A shared, and edits its config: the stages downstream of the model must
    // run, and their uploads are refused.
    let config = b.run.join(".hydra/config.yaml");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, original.replace("model:\n", "model:\n  box_score_thresh: 0.2\n")).unwrap();
    let (o, v) = build(&b, &moto, &moto.ro, &url, &["--no-parity-check"]);
    ok(&o);
    assert!(!built(&v).is_empty(), "{v:#}");
    assert_eq!(stat(&v, "uploads"), 0, "{v:#}");
    assert_eq!(v["remote"]["state"], "read-only", "{v:#}");
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(count(&log, "warning:"), 1, "exactly one warning: {log}");
    assert!(log.contains("refused") && log.contains("read-only"), "{log}");
    assert_eq!(moto.keys("shared/"), before, "nothing uploaded");

    // The unchanged config hits with read-only credentials, without a warning.
    std::fs::write(&config, &original).unwrap();
    let (o, v) = build(&b, &moto, &moto.ro, &url, &["--no-parity-check"]);
    ok(&o);
    assert!(built(&v).is_empty(), "{v:#}");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", text(&o));

    // A push with read-only credentials fails, after its one warning.
    let ds = eval_dataset();
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &b.store);
    std::fs::write(&config, original.replace("model:\n", "model:\n  box_score_thresh: 0.2\n")).unwrap();
    let o = moto.env(&mut cmd, &moto.ro).args(["push", b.run.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap()]);
    let o = o.args(["--no-parity-check", "--quiet", "--remote", &url]).output().unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("push: the remote could not be written"), "{}", text(&o));
    assert_eq!(moto.keys("shared/"), before, "nothing uploaded");

    // `remote check` tells read-only credentials from read-write ones.
    let check = |creds: &Credentials| {
        let mut cmd = Command::new(mkonnx_binary());
        moto.env(&mut cmd, creds).args(["remote", "check", "--remote", &url]).output().unwrap()
    };
    let rw = check(&moto.rw);
    assert!(rw.status.success(), "{}", text(&rw));
    assert!(text(&rw).contains("ok      conditional put"), "{}", text(&rw));
    let ro = check(&moto.ro);
    assert!(!ro.status.success() && text(&ro).contains("ok      read") && text(&ro).contains("FAILED  write"), "{}", text(&ro));
}

#[test]
fn a_dead_endpoint_falls_back_to_local_or_fails_when_required() {
    let t = tempfile::tempdir().unwrap();
    let a = machine(t.path(), "a");
    let ds = eval_dataset();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let run = |extra: &[&str]| {
        let mut cmd = mkonnx_command_for(&mkonnx_binary(), &a.store);
        cmd.env("AWS_ENDPOINT_URL", &dead).env("AWS_ALLOW_HTTP", "true").env("AWS_REGION", "us-east-1");
        cmd.env("AWS_ACCESS_KEY_ID", "x").env("AWS_SECRET_ACCESS_KEY", "y");
        cmd.args(["build", a.run.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "--no-parity-check", "--json"]);
        cmd.args(["--remote", "s3://nobody/cache"]).args(extra);
        let started = std::time::Instant::now();
        let o = cmd.output().unwrap();
        (o, started.elapsed())
    };
    let (o, elapsed) = run(&["--remote-required"]);
    assert!(!o.status.success(), "{}", text(&o));
    let log = text(&o);
    assert!(log.contains("remote store s3://nobody/cache is unavailable"), "{log}");
    assert!(!a.run.join("onnx_model/model.onnx").exists(), "nothing built when the remote is required and down");
    // A hang check, not a speed test: retries and timeouts are bounded.
    assert!(elapsed.as_secs() < 60, "{elapsed:?}");

    // A server that accepts connections and never answers: the small requests' timeout
    // (10 s, retries within it) bounds the wait.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = mkonnx_command_for(&mkonnx_binary(), &t.path().join("store-hung"));
    cmd.env("AWS_ENDPOINT_URL", format!("http://{}", hung.local_addr().unwrap())).env("AWS_ALLOW_HTTP", "true");
    cmd.env("AWS_REGION", "us-east-1").env("AWS_ACCESS_KEY_ID", "x").env("AWS_SECRET_ACCESS_KEY", "y");
    cmd.args(["build", a.run.to_str().unwrap(), "--dataset-dir", ds.to_str().unwrap(), "--no-parity-check"]);
    let started = std::time::Instant::now();
    let o = cmd.args(["--remote", "s3://nobody/cache", "--remote-required"]).output().unwrap();
    assert!(!o.status.success() && text(&o).contains("is unavailable"), "{}", text(&o));
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    drop(hung);

    let (o, elapsed) = run(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(count(&log, "warning:"), 1, "{log}");
    assert!(log.contains("unavailable") && log.contains("continuing with the local store only"), "{log}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["remote"]["state"], "unavailable");
    assert_eq!(built(&v).len(), 4);
    assert!(elapsed.as_secs() < 120, "{elapsed:?}");
}

#[test]
fn a_format_marker_of_another_version_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let moto = Moto::start(t.path());
    let marker = t.path().join("marker.json");
    std::fs::write(&marker, br#"{"format":"mkonnx-remote","version":99}"#).unwrap();
    moto.put_file("future/mkonnx-remote.json", &marker);
    let a = machine(t.path(), "a");
    for extra in [&[][..], &["--remote-mode", "ro"][..]] {
        let mut args = vec!["--no-parity-check"];
        args.extend_from_slice(extra);
        let (o, _) = build(&a, &moto, &moto.rw, &moto.url("future"), &args);
        assert!(!o.status.success(), "{}", text(&o));
        let log = text(&o);
        assert!(log.contains("mkonnx-remote.json says mkonnx-remote version 99") && log.contains("reads mkonnx-remote version 1"), "{log}");
        assert!(!a.run.join("onnx_model").exists());
    }
    assert_eq!(moto.keys("future/"), ["future/mkonnx-remote.json"]);
}

#[test]
fn shards_partition_runs_exactly_and_adding_runs_moves_none() {
    let t = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..40).map(|i| format!("outputs/2026-02-{:02}/{:02}-15-47", i % 28 + 1, i)).collect();
    let plan = |names: &[String], spec: &str, env: &[(&str, &str)]| -> Vec<String> {
        let mut cmd = Command::new(mkonnx_binary());
        cmd.current_dir(t.path()).arg("plan").args(names).args(["--shard", spec]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8(o.stdout).unwrap().lines().map(str::to_string).collect()
    };
    let shards: Vec<Vec<String>> = (0..4).map(|k| plan(&names, &format!("{k}/4"), &[])).collect();
    let mut union: Vec<String> = shards.concat();
    union.sort();
    let mut all = names.clone();
    all.sort();
    assert_eq!(union, all, "every run in exactly one shard");
    assert!(shards.iter().all(|s| !s.is_empty()), "{shards:?}");

    let more: Vec<String> = names.iter().cloned().chain((0..20).map(|i| format!("outputs/2026-03-01/{i:02}-00-00"))).collect();
    for (k, before) in shards.iter().enumerate() {
        let after = plan(&more, &format!("{k}/4"), &[]);
        assert!(before.iter().all(|r| after.contains(r)), "shard {k} lost runs when runs were added");
    }
    // The same run named absolutely, and Slurm's and Kubernetes' task variables.
    let absolute: Vec<String> = names.iter().map(|n| t.path().join(n).display().to_string()).collect();
    let abs_shard: Vec<String> =
        plan(&absolute, "1/4", &[]).iter().map(|p| p.strip_prefix(&format!("{}/", t.path().display())).unwrap().to_string()).collect();
    assert_eq!(abs_shard, shards[1]);
    assert_eq!(
        plan(&names, "auto", &[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_COUNT", "4")]),
        shards[2]
    );
    assert_eq!(plan(&names, "auto", &[("JOB_COMPLETION_INDEX", "3"), ("MKONNX_SHARD_COUNT", "4")]), shards[3]);
    let o = Command::new(mkonnx_binary()).current_dir(t.path()).args(["plan", "/elsewhere/run", "--shard", "0/2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("not under the shard root"), "{}", text(&o));
}
