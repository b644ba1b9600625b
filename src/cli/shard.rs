//! Sharding the runs of one command across the tasks of a job array (Slurm `--array`,
//! Kubernetes Indexed Jobs): `--shard K/N` keeps the runs whose stable id hashes into
//! shard K of N.
//!
//! A run's stable id is its directory's path relative to the shard root (`--shard-root`,
//! default the current directory), normalized lexically (`.` and `..` resolved, no symlinks
//! followed) and written with `/`. It never contains an absolute path, so every task of an
//! array (each on its own machine, each with the same working directory and the same
//! `outputs/*/*` arguments) computes the same partition. The shard is
//! `blake3(id) mod N`: a run's shard depends on its id alone, so adding runs moves none of
//! the others.

use std::path::{Component, Path, PathBuf};

/// Shard `index` of `count` (0-based: 0..count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: u64,
    /// How many shards.
    pub count: u64,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Parses `K/N`, or `auto`: `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT` (an array of consecutive ids, such as `--array=0-9`), else
    /// Kubernetes' `JOB_COMPLETION_INDEX` of `count` (`--shard-count`, since an Indexed Job
    /// does not tell its pods how many completions it has). `env` reads a variable.
    pub fn parse(spec: &str, count: Option<u64>, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard, String> {
        let number = |name: &str, text: &str| text.trim().parse::<u64>().map_err(|_| format!("{name} is {text:?}, not a whole number"));
        let shard = if spec == "auto" {
            if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
                let id = number("SLURM_ARRAY_TASK_ID", &id)?;
                let min = env("SLURM_ARRAY_TASK_MIN").map(|m| number("SLURM_ARRAY_TASK_MIN", &m)).transpose()?.unwrap_or(0);
                if let Some(step) = env("SLURM_ARRAY_TASK_STEP") {
                    if number("SLURM_ARRAY_TASK_STEP", &step)? != 1 {
                        return Err("--shard auto needs a Slurm array of consecutive task ids (e.g. --array=0-9), not a stepped one".into());
                    }
                }
                let total =
                    env("SLURM_ARRAY_TASK_COUNT").ok_or("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
                let total = number("SLURM_ARRAY_TASK_COUNT", &total)?;
                Shard { index: id.checked_sub(min).ok_or("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?, count: total }
            } else if let Some(index) = env("JOB_COMPLETION_INDEX") {
                let count = count.ok_or(
                    "--shard auto with JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) needs --shard-count N (the Job's completions)",
                )?;
                Shard { index: number("JOB_COMPLETION_INDEX", &index)?, count }
            } else {
                return Err(
                    "--shard auto: neither SLURM_ARRAY_TASK_ID (Slurm job array) nor JOB_COMPLETION_INDEX (Kubernetes Indexed Job) is set"
                        .into(),
                );
            }
        } else {
            let (k, n) =
                spec.split_once('/').ok_or_else(|| format!("--shard {spec:?}: use K/N (e.g. 0/4: the first of 4 shards) or auto"))?;
            Shard { index: number("--shard's K", k)?, count: number("--shard's N", n)? }
        };
        if shard.count == 0 || shard.index >= shard.count {
            return Err(format!("shard {shard}: K must be from 0 to N-1, and N at least 1"));
        }
        Ok(shard)
    }

    /// Whether the run with stable id `id` belongs to this shard.
    pub fn contains(&self, id: &str) -> bool {
        shard_of(id, self.count) == self.index
    }
}

/// The shard of the run with stable id `id` among `count`: blake3 of the id, its first 8
/// bytes as a little-endian number, modulo `count`.
pub fn shard_of(id: &str, count: u64) -> u64 {
    let digest = blake3::hash(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first) % count.max(1)
}

/// `path` made absolute against `cwd` and normalized lexically.
fn normalize(path: &Path, cwd: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in cwd.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The stable id of run directory `dir`: its path relative to `root` (both taken relative to
/// `cwd` when relative), components joined with `/`.
pub fn run_id(dir: &Path, root: &Path, cwd: &Path) -> Result<String, String> {
    let (dir_abs, root_abs) = (normalize(dir, cwd), normalize(root, cwd));
    let relative = dir_abs.strip_prefix(&root_abs).map_err(|_| {
        format!(
            "run directory {} is not under the shard root {}: sharding names runs by their path relative to it; \
             pass --shard-root (default: the current directory)",
            dir.display(),
            root_abs.display()
        )
    })?;
    let parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    Ok(parts.join("/"))
}

/// The run directories of `dirs` in `shard`, in their given order.
pub fn select<'a>(dirs: &'a [PathBuf], shard: Shard, root: &Path) -> Result<Vec<&'a PathBuf>, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    let mut selected = Vec::new();
    for dir in dirs {
        if shard.contains(&run_id(dir, root, &cwd)?) {
            selected.push(dir);
        }
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn ids_are_relative_normalized_and_slash_separated() {
        let cwd = Path::new("/home/u/project");
        assert_eq!(run_id(Path::new("outputs/2026-01-01/10-00-00"), Path::new("."), cwd).unwrap(), "outputs/2026-01-01/10-00-00");
        assert_eq!(run_id(Path::new("./outputs/../outputs/a/"), Path::new("."), cwd).unwrap(), "outputs/a");
        // The same run named absolutely, or from another root, has the same id.
        assert_eq!(run_id(Path::new("/home/u/project/outputs/a"), Path::new("/home/u/project"), Path::new("/tmp")).unwrap(), "outputs/a");
        assert_eq!(run_id(Path::new("a"), Path::new(".."), Path::new("/home/u/project/outputs")).unwrap(), "outputs/a");
        let err = run_id(Path::new("/elsewhere/a"), Path::new("."), cwd).unwrap_err();
        assert!(err.contains("/elsewhere/a") && err.contains("--shard-root"), "{err}");
    }

    #[test]
    fn shards_partition_the_runs_and_adding_runs_moves_none() {
        let ids: Vec<String> = (0..300).map(|i| format!("outputs/2026-02-{:02}/{:02}-15-47", i % 28 + 1, i)).collect();
        for count in [1, 2, 3, 7] {
            let mut seen = BTreeSet::new();
            for index in 0..count {
                let shard = Shard { index, count };
                for id in ids.iter().filter(|id| shard.contains(id)) {
                    assert!(seen.insert(id.clone()), "{id} in two shards");
                }
            }
            assert_eq!(seen.len(), ids.len(), "every run in one of {count} shards");
        }
        // Every shard gets some of 300 runs (a hash, not an alphabetical split).
        assert!((0..7).all(|index| ids.iter().any(|id| Shard { index, count: 7 }.contains(id))));
        let before: Vec<u64> = ids.iter().map(|id| shard_of(id, 7)).collect();
        let more: Vec<String> = ids.iter().cloned().chain((0..100).map(|i| format!("outputs/new/{i}"))).collect();
        let after: Vec<u64> = more.iter().take(ids.len()).map(|id| shard_of(id, 7)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn shard_specs_and_scheduler_variables() {
        let none = env_of(&[]);
        assert_eq!(Shard::parse("2/5", None, &none).unwrap(), Shard { index: 2, count: 5 });
        for bad in ["5/5", "1/0", "x/3", "3", "-1/3"] {
            assert!(Shard::parse(bad, None, &none).is_err(), "{bad}");
        }
        let slurm = env_of(&[("SLURM_ARRAY_TASK_ID", "11"), ("SLURM_ARRAY_TASK_MIN", "10"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert_eq!(Shard::parse("auto", None, &slurm).unwrap(), Shard { index: 1, count: 4 });
        let stepped = env_of(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_STEP", "2"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert!(Shard::parse("auto", None, &stepped).unwrap_err().contains("consecutive"));
        let k8s = env_of(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(Shard::parse("auto", Some(8), &k8s).unwrap(), Shard { index: 3, count: 8 });
        assert!(Shard::parse("auto", None, &k8s).unwrap_err().contains("--shard-count"));
        assert!(Shard::parse("auto", None, &none).unwrap_err().contains("JOB_COMPLETION_INDEX"));
    }
}
