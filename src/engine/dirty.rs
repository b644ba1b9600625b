//! `status`: is each node fresh, and if not, why? Answered without running anything.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use super::exec::{Engine, Force};
use super::freshness::{reusable_result, stale_copy, StaleReason};
use super::graph::{Graph, NodeHandle};
use super::hash::Hash;
use super::stage::HashedFile;
use super::EngineError;

/// A node's state as `status` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeStatus {
    /// A build would do nothing for this node.
    Fresh,
    /// Its result is in the store; a build would only copy back these outputs.
    Restore(Vec<StaleReason>),
    /// A build would run its stage (or, with only [`StaleReason::UpstreamStale`], might).
    Stale(Vec<StaleReason>),
}

impl NodeStatus {
    /// The reasons, empty when fresh.
    pub fn reasons(&self) -> &[StaleReason] {
        match self {
            NodeStatus::Fresh => &[],
            NodeStatus::Restore(r) | NodeStatus::Stale(r) => r,
        }
    }
}

/// One node's line in a [`StatusReport`].
#[derive(Clone, Debug)]
pub struct NodeStatusReport {
    /// The node.
    pub node: NodeHandle,
    /// `stage [labels]`.
    pub name: String,
    /// Its labels.
    pub labels: Vec<String>,
    /// Fresh, restorable or stale, and why.
    pub status: NodeStatus,
}

/// The result of [`Engine::status`], one entry per node in graph order.
#[derive(Clone, Debug)]
pub struct StatusReport {
    /// Indexed by [`NodeHandle::index`].
    pub nodes: Vec<NodeStatusReport>,
}

impl StatusReport {
    /// Whether a build would do nothing.
    pub fn all_fresh(&self) -> bool {
        self.nodes.iter().all(|n| n.status == NodeStatus::Fresh)
    }

    /// The entry of node `h`.
    pub fn get(&self, h: NodeHandle) -> &NodeStatusReport {
        &self.nodes[h.0]
    }

    /// The Graphviz fill colour of node `h` in `mkonnx graph`: green fresh, yellow
    /// restorable, salmon stale.
    pub fn dot_fill(&self, h: NodeHandle) -> &'static str {
        match self.get(h).status {
            NodeStatus::Fresh => "palegreen",
            NodeStatus::Restore(_) => "lightyellow",
            NodeStatus::Stale(_) => "lightsalmon",
        }
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.nodes {
            let (word, reasons) = match &n.status {
                NodeStatus::Fresh => ("fresh  ", &[][..]),
                NodeStatus::Restore(r) => ("restore", &r[..]),
                NodeStatus::Stale(r) => ("stale  ", &r[..]),
            };
            write!(f, "{word} {}", n.name)?;
            for (i, r) in reasons.iter().enumerate() {
                write!(f, "{}{r}", if i == 0 { ": " } else { "; " })?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl Engine {
    /// Says, for every node, whether a build would run it, restore its outputs, or do
    /// nothing, and why; runs no stage (a dry run). Hashes inputs through the stat cache
    /// and saves new cache records, so a following build does not hash them again.
    pub fn status(&self, graph: &Graph, force: &Force) -> Result<StatusReport, EngineError> {
        let hasher = self.new_hasher();
        // Output hashes of nodes that would not run; `None` for the others, whose outputs
        // are unknown until they run.
        let mut known: Vec<Option<Hash>> = vec![None; graph.len()];
        let mut nodes = Vec::with_capacity(graph.len());
        for h in graph.handles() {
            let node = graph.node(h);
            let mut reasons = Vec::new();
            if force.contains(h) {
                reasons.push(StaleReason::Forced);
            }
            let record = self.store.node_record(&node.id.0)?;
            match &record {
                None => reasons.push(StaleReason::NeverBuilt),
                Some(rec) => {
                    if rec.stage_version != node.version {
                        reasons.push(StaleReason::StageVersionChanged { old: rec.stage_version, new: node.version });
                    }
                    if rec.tool_version != self.tool_version {
                        reasons.push(StaleReason::ToolVersionChanged { old: rec.tool_version.clone(), new: self.tool_version.clone() });
                    }
                    let mut keys = Vec::new();
                    changed_keys(&rec.params, &node.params, "", &mut keys);
                    if !keys.is_empty() {
                        reasons.push(StaleReason::ParamsChanged { keys });
                    }
                }
            }
            let old_inputs: BTreeMap<&str, Hash> =
                record.as_ref().map(|r| r.inputs.iter().map(|i| (i.name.as_str(), i.hash)).collect()).unwrap_or_default();

            let mut complete = true;
            let mut files = Vec::new();
            for (name, path) in &node.files {
                match hasher.hash(path) {
                    Ok((hash, stat)) => {
                        // The node id covers input names, so a record has every input.
                        if let Some(&old) = old_inputs.get(name.as_str()) {
                            if old != hash {
                                reasons.push(StaleReason::InputChanged { input: name.clone(), old_hash: old, new_hash: hash });
                            }
                        }
                        files.push(HashedFile { name: name.clone(), path: path.clone(), hash, stat });
                    }
                    Err(e) => {
                        complete = false;
                        reasons.push(StaleReason::InputUnreadable {
                            input: name.clone(),
                            path: path.clone(),
                            error: match e {
                                EngineError::Io { source, .. } => source.to_string(),
                                other => other.to_string(),
                            },
                        });
                    }
                }
            }
            let mut upstream = Vec::new();
            for (input, up) in &node.upstream {
                match known[up.0] {
                    Some(hash) => {
                        if old_inputs.get(input.as_str()).is_some_and(|&old| old != hash) {
                            reasons.push(StaleReason::UpstreamChanged { input: input.clone(), node: graph.display_name(*up) });
                        }
                        upstream.push((input.as_str(), hash));
                    }
                    None => {
                        complete = false;
                        reasons.push(StaleReason::UpstreamStale { input: input.clone(), node: graph.display_name(*up) });
                    }
                }
            }
            let status = if complete {
                let key = self.key_of(node, &files, upstream.into_iter());
                match reusable_result(&self.store, &key, force.contains(h))? {
                    Some(result) => {
                        // The key is stored: whatever differs from the last record, a build
                        // only checks the materialized files.
                        reasons.clear();
                        match node.materialization_plan(&result.artifacts) {
                            Ok(plan) => {
                                reasons.extend(plan.iter().filter_map(|(dest, _, blob)| stale_copy(&hasher, dest, blob)));
                            }
                            Err(EngineError::MissingArtifact { artifact, dest, .. }) => {
                                reasons.push(StaleReason::MissingArtifact { artifact, path: dest });
                            }
                            Err(e) => return Err(e),
                        }
                        let unbuildable = reasons.iter().any(|r| matches!(r, StaleReason::MissingArtifact { .. }));
                        if unbuildable {
                            NodeStatus::Stale(reasons)
                        } else {
                            known[h.0] = Some(result.output_hash);
                            if reasons.is_empty() {
                                NodeStatus::Fresh
                            } else {
                                NodeStatus::Restore(reasons)
                            }
                        }
                    }
                    None => {
                        if reasons.is_empty() {
                            reasons.push(StaleReason::NotInStore);
                        }
                        NodeStatus::Stale(reasons)
                    }
                }
            } else {
                NodeStatus::Stale(reasons)
            };
            nodes.push(NodeStatusReport { node: h, name: graph.display_name(h), labels: node.labels.clone(), status });
        }
        hasher.flush()?;
        Ok(StatusReport { nodes })
    }
}

/// Dotted paths at which `new` differs from `old`; objects are compared key by key,
/// anything else as a whole.
fn changed_keys(old: &Value, new: &Value, at: &str, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => changed_keys(x, y, &path, out),
                    _ => out.push(path),
                }
            }
        }
        _ if old != new => out.push(if at.is_empty() { "(all)".to_string() } else { at.to_string() }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_keys_are_dotted_paths() {
        let mut out = Vec::new();
        changed_keys(
            &json!({"opset": 17, "model": {"min_size": 800, "max_size": 1333}, "gone": 1}),
            &json!({"opset": 17, "model": {"min_size": 640, "max_size": 1333}, "new": [1]}),
            "",
            &mut out,
        );
        assert_eq!(out, ["gone", "model.min_size", "new"]);
        let mut out = Vec::new();
        changed_keys(&json!(1), &json!(2), "", &mut out);
        assert_eq!(out, ["(all)"]);
        let mut out = Vec::new();
        changed_keys(&json!({"a": [1, 2]}), &json!({"a": [1, 2]}), "", &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn reasons_render_for_users() {
        let h1 = crate::engine::hash_bytes(b"1");
        let h2 = crate::engine::hash_bytes(b"2");
        let r = StaleReason::InputChanged { input: "checkpoint".into(), old_hash: h1, new_hash: h2 };
        assert_eq!(r.to_string(), format!("input `checkpoint` changed ({} -> {})", h1.short(), h2.short()));
        assert_eq!(
            StaleReason::ParamsChanged { keys: vec!["opset".into(), "model.min_size".into()] }.to_string(),
            "parameters changed: opset, model.min_size"
        );
        assert_eq!(StaleReason::StageVersionChanged { old: 1, new: 2 }.to_string(), "stage version changed (1 -> 2)");
    }
}
