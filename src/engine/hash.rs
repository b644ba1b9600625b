//! Content hashes, domain-separated key derivation and canonical JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde_json::Value;

/// Domain of stage keys. Bump the suffix when the key's layout changes, so that old
/// store entries can never be mistaken for new ones.
pub(crate) const STAGE_KEY_DOMAIN: &str = "mkonnx.stage-key.v1";
/// Domain of node identities.
pub(crate) const NODE_ID_DOMAIN: &str = "mkonnx.node-id.v1";
/// Domain of a node's output-set hash (what dependents see of it).
pub(crate) const OUTPUT_SET_DOMAIN: &str = "mkonnx.output-set.v1";

/// A 32-byte blake3 hash: of a file's bytes (plain blake3, so `b3sum` agrees), or a
/// domain-separated key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; 32]);

impl Hash {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Hash> {
        blake3::Hash::from_hex(s).ok().map(|h| Hash(*h.as_bytes()))
    }

    /// The first 12 hex characters, for messages.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Hash::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("not a hash: {s:?}")))
    }
}

/// blake3 of a byte slice.
pub fn hash_bytes(bytes: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    update(&mut hasher, bytes);
    hasher.finalize().into()
}

/// Feeds `bytes` to `hasher`, on rayon's pool when they are large enough to split across
/// cores (every large hash in the engine goes through here).
pub(crate) fn update(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    if bytes.len() >= 1 << 17 {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
}

/// blake3 of a file's bytes, read in large chunks that are hashed on rayon's global pool
/// (several GB/s for a checkpoint of a few hundred MB on a multi-core machine).
///
/// Plain reads rather than a memory map: a mapped file truncated by another process
/// (a trainer rewriting `best_model.pth` in place) kills the reader with SIGBUS, while a
/// read just returns fewer bytes, and the caller's stat check then notices the change.
pub fn hash_file(path: &Path) -> std::io::Result<Hash> {
    /// Large enough for rayon to split across cores, small enough to stay in cache.
    const CHUNK: usize = 8 << 20;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK)).max(1 << 16)];
    let mut hasher = blake3::Hasher::new();
    loop {
        let n = read_full(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        update(&mut hasher, &buf[..n]);
        if n < buf.len() {
            break;
        }
    }
    Ok(hasher.finalize().into())
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Incremental, domain-separated hashing of tagged fields. Every tag and value is
/// length-prefixed, so no two different field sequences produce the same byte stream.
pub(crate) struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    pub(crate) fn new(domain: &'static str) -> Self {
        KeyHasher(blake3::Hasher::new_derive_key(domain))
    }

    pub(crate) fn bytes(&mut self, tag: &str, value: &[u8]) -> &mut Self {
        self.0.update(&(tag.len() as u64).to_le_bytes());
        self.0.update(tag.as_bytes());
        self.0.update(&(value.len() as u64).to_le_bytes());
        self.0.update(value);
        self
    }

    pub(crate) fn str(&mut self, tag: &str, value: &str) -> &mut Self {
        self.bytes(tag, value.as_bytes())
    }

    pub(crate) fn u64(&mut self, tag: &str, value: u64) -> &mut Self {
        self.bytes(tag, &value.to_le_bytes())
    }

    pub(crate) fn hash(&mut self, tag: &str, value: &Hash) -> &mut Self {
        self.bytes(tag, value.as_bytes())
    }

    pub(crate) fn finish(&self) -> Hash {
        self.0.finalize().into()
    }
}

/// Whether an input is a file on disk or another node's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum InputKind {
    File,
    Node,
}

impl InputKind {
    fn tag(self) -> &'static str {
        match self {
            InputKind::File => "file",
            InputKind::Node => "node",
        }
    }
}

/// The ingredients of a stage key; see the table in the module docs.
pub(crate) struct KeyIngredients<'a> {
    pub stage: &'a str,
    pub version: u32,
    pub tool_version: &'a str,
    pub params_canonical: &'a str,
    /// (input name, kind, content hash); order does not matter.
    pub inputs: &'a [(String, InputKind, Hash)],
}

pub(crate) fn stage_key(k: &KeyIngredients<'_>) -> Hash {
    let mut inputs: Vec<&(String, InputKind, Hash)> = k.inputs.iter().collect();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = KeyHasher::new(STAGE_KEY_DOMAIN);
    h.str("stage", k.stage)
        .u64("version", u64::from(k.version))
        .str("tool", k.tool_version)
        .str("params", k.params_canonical)
        .u64("inputs", inputs.len() as u64);
    for (name, kind, hash) in inputs {
        h.str("input", name).str("kind", kind.tag()).hash("hash", hash);
    }
    h.finish()
}

/// The hash dependents see of a node: its artifact names and blob hashes.
pub(crate) fn output_set_hash(artifacts: &BTreeMap<String, Hash>) -> Hash {
    let mut h = KeyHasher::new(OUTPUT_SET_DOMAIN);
    h.u64("artifacts", artifacts.len() as u64);
    for (name, blob) in artifacts {
        h.str("name", name).hash("blob", blob);
    }
    h.finish()
}

/// JSON with object keys sorted (by their UTF-8 bytes) and no whitespace, so equal values
/// always serialize to equal bytes whatever map type or insertion order produced them.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        // Scalars: serde_json's own formatting (shortest round-trip floats, escaped strings).
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingredients<'a>(inputs: &'a [(String, InputKind, Hash)]) -> KeyIngredients<'a> {
        KeyIngredients { stage: "export", version: 1, tool_version: "0.1.0", params_canonical: r#"{"opset":17}"#, inputs }
    }

    #[test]
    fn canonical_json_sorts_keys_recursively_and_keeps_array_order() {
        let a = json!({"b": 1, "a": {"z": [3, 1], "y": "s"}, "c": 0.1});
        let mut m = serde_json::Map::new();
        m.insert("c".into(), json!(0.1));
        m.insert("a".into(), json!({"y": "s", "z": [3, 1]}));
        m.insert("b".into(), json!(1));
        let b = Value::Object(m);
        assert_eq!(canonical_json(&a), r#"{"a":{"y":"s","z":[3,1]},"b":1,"c":0.1}"#);
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_ne!(canonical_json(&json!([1, 3])), canonical_json(&json!([3, 1])));
    }

    #[test]
    fn key_ignores_input_order_but_not_any_ingredient() {
        let h1 = hash_bytes(b"one");
        let h2 = hash_bytes(b"two");
        let inputs = vec![("config".to_string(), InputKind::File, h1), ("checkpoint".to_string(), InputKind::File, h2)];
        let reversed: Vec<_> = inputs.iter().rev().cloned().collect();
        let base = stage_key(&ingredients(&inputs));
        assert_eq!(base, stage_key(&ingredients(&reversed)));

        let mut k = ingredients(&inputs);
        k.stage = "export2";
        assert_ne!(base, stage_key(&k));
        let mut k = ingredients(&inputs);
        k.version = 2;
        assert_ne!(base, stage_key(&k));
        let mut k = ingredients(&inputs);
        k.tool_version = "0.1.1";
        assert_ne!(base, stage_key(&k));
        let mut k = ingredients(&inputs);
        k.params_canonical = r#"{"opset":18}"#;
        assert_ne!(base, stage_key(&k));

        let swapped_hashes = vec![("config".to_string(), InputKind::File, h2), ("checkpoint".to_string(), InputKind::File, h1)];
        assert_ne!(base, stage_key(&ingredients(&swapped_hashes)));
        let node_kind = vec![("config".to_string(), InputKind::Node, h1), ("checkpoint".to_string(), InputKind::File, h2)];
        assert_ne!(base, stage_key(&ingredients(&node_kind)));
    }

    #[test]
    fn fields_are_unambiguous() {
        // Without length prefixes "ab"+"c" and "a"+"bc" would collide.
        let mut x = KeyHasher::new(STAGE_KEY_DOMAIN);
        x.str("t", "ab").str("t", "c");
        let mut y = KeyHasher::new(STAGE_KEY_DOMAIN);
        y.str("t", "a").str("t", "bc");
        assert_ne!(x.finish(), y.finish());
        // The same fields under another domain give another hash.
        let mut z = KeyHasher::new(NODE_ID_DOMAIN);
        z.str("t", "ab").str("t", "c");
        assert_ne!(x.finish(), z.finish());
    }

    #[test]
    fn output_set_hash_depends_on_names_and_contents() {
        let mut a = BTreeMap::new();
        a.insert("model.onnx".to_string(), hash_bytes(b"m"));
        let mut b = a.clone();
        b.insert("summary.txt".to_string(), hash_bytes(b"s"));
        let mut c = BTreeMap::new();
        c.insert("model2.onnx".to_string(), hash_bytes(b"m"));
        assert_ne!(output_set_hash(&a), output_set_hash(&b));
        assert_ne!(output_set_hash(&a), output_set_hash(&c));
        assert_eq!(output_set_hash(&a), output_set_hash(&a.clone()));
    }

    #[test]
    fn file_hash_is_plain_blake3_of_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let big: Vec<u8> = (0..20_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &big).unwrap();
        assert_eq!(hash_file(&p).unwrap(), hash_bytes(&big));
        std::fs::write(&p, b"").unwrap();
        assert_eq!(hash_file(&p).unwrap(), hash_bytes(b""));
    }

    #[test]
    fn hex_round_trip() {
        let h = hash_bytes(b"x");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(h.short().len(), 12);
    }
}
