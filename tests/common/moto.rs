//! A real S3 API on loopback for the remote-store tests: `moto_server` (from `moto[server]`
//! in reference/requirements.txt) on a free port, with a bucket, a read-write and a read-only
//! IAM user, and authentication enforced. It is stopped (killed) when dropped, and dies with
//! the test process. If it cannot start, the test fails with the reason: it never skips.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An access key of one of the server's IAM users.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// AWS_ACCESS_KEY_ID.
    pub key: String,
    /// AWS_SECRET_ACCESS_KEY.
    pub secret: String,
}

/// A running moto_server.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bucket made at start.
    pub bucket: String,
    /// A user allowed everything on S3.
    pub rw: Credentials,
    /// A user allowed only GetObject and ListBucket.
    pub ro: Credentials,
    log: PathBuf,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a loopback port").local_addr().unwrap().port()
}

impl Moto {
    /// Starts moto_server from the project's .venv and sets it up; panics with the reason
    /// (and the server's log) if it cannot.
    pub fn start(log_dir: &Path) -> Moto {
        let python = super::python();
        let server = python.with_file_name("moto_server");
        assert!(
            server.is_file(),
            "{} is missing: install the test requirements (.venv/bin/python -m pip install -r reference/requirements.txt)",
            server.display()
        );
        let port = free_port();
        let log = log_dir.join("moto.log");
        let log_file = std::fs::File::create(&log).expect("create moto.log");
        let mut cmd = Command::new(&server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdin(Stdio::null()).stdout(log_file.try_clone().unwrap()).stderr(log_file);
        // SAFETY: prctl in the child before exec, async-signal-safe: moto dies with the test.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "mkonnx-remote-test".into(),
            rw: Credentials { key: String::new(), secret: String::new() },
            ro: Credentials { key: String::new(), secret: String::new() },
            log,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto_server exited ({status}) before answering: {}", moto.log_text());
            }
            assert!(started.elapsed() < Duration::from_secs(60), "moto_server did not answer within 60 s: {}", moto.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        let setup = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/moto_setup.py"))
            .args([&moto.endpoint, &moto.bucket])
            .output()
            .expect("run moto_setup.py");
        assert!(setup.status.success(), "moto_setup.py failed: {}\n{}", super::text(&setup), moto.log_text());
        let users: serde_json::Value = serde_json::from_slice(&setup.stdout).expect("moto_setup.py prints JSON");
        let creds =
            |u: &serde_json::Value| Credentials { key: u["key"].as_str().unwrap().into(), secret: u["secret"].as_str().unwrap().into() };
        moto.rw = creds(&users["rw"]);
        moto.ro = creds(&users["ro"]);
        moto
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Points `cmd` (mkonnx) at this server with `creds`.
    pub fn env<'c>(&self, cmd: &'c mut Command, creds: &Credentials) -> &'c mut Command {
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &creds.key)
            .env("AWS_SECRET_ACCESS_KEY", &creds.secret)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
    }

    /// Runs a boto3 snippet with the read-write user (`s3` is a client, `bucket` the bucket,
    /// `args` the extra arguments as `sys.argv[1:]`); returns its stdout.
    pub fn boto3(&self, snippet: &str, args: &[&str]) -> String {
        let program = format!(
            "import sys, boto3\ns3 = boto3.client('s3', endpoint_url={:?}, region_name='us-east-1', \
             aws_access_key_id={:?}, aws_secret_access_key={:?})\nbucket = {:?}\n{snippet}",
            self.endpoint, self.rw.key, self.rw.secret, self.bucket
        );
        let o = Command::new(super::python()).arg("-c").arg(program).args(args).output().expect("run python");
        assert!(o.status.success(), "boto3 snippet failed: {}", super::text(&o));
        String::from_utf8(o.stdout).unwrap()
    }

    /// Every object name under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.boto3(
            "p = s3.get_paginator('list_objects_v2')\n\
             for page in p.paginate(Bucket=bucket, Prefix=sys.argv[1]):\n    \
             for o in page.get('Contents', []): print(o['Key'])",
            &[prefix],
        );
        let mut keys: Vec<String> = out.lines().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// Writes the bytes of file `path` to object `key`.
    pub fn put_file(&self, key: &str, path: &Path) {
        self.boto3("s3.put_object(Bucket=bucket, Key=sys.argv[1], Body=open(sys.argv[2], 'rb').read())", &[key, path.to_str().unwrap()]);
    }

    /// Deletes object `key`.
    pub fn delete(&self, key: &str) {
        self.boto3("s3.delete_object(Bucket=bucket, Key=sys.argv[1])", &[key]);
    }

    /// Writes object `key` to file `path`.
    pub fn get_file(&self, key: &str, path: &Path) {
        self.boto3(
            "open(sys.argv[2], 'wb').write(s3.get_object(Bucket=bucket, Key=sys.argv[1])['Body'].read())",
            &[key, path.to_str().unwrap()],
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
