//! Reading Kubernetes objects from YAML (`--objects PATH`): a file or a directory of files, each with
//! one or more documents. Only v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node are used; other kinds
//! (Deployments in the same manifests, say) are ignored, and a document that cannot be decoded is
//! reported and skipped without losing the rest.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;

/// The objects of one sync. Shared, not copied: the API server source hands out the reflector
/// stores' own `Arc`s, so taking a snapshot of 100,000 objects copies 100,000 pointers.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Nodes (only this node's topology labels are used).
    pub nodes: Vec<Arc<Node>>,
    /// Documents that could not be decoded.
    pub errors: Vec<Skipped>,
}

/// What a skip concerned: metrics count by it, logs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkippedKind {
    Service,
    EndpointSlice,
    Node,
    /// A YAML document that is no object at all (invalid YAML).
    Document,
}

impl SkippedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::Document => "document",
        }
    }
}

/// An object left out of the desired state, or the part of one that was (an endpoint, a port), and
/// why. Metrics use `kind` directly; the log line is its Display.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    pub kind: SkippedKind,
    /// `namespace/name`, or for a document `ORIGIN document INDEX`.
    pub object: String,
    /// The whole object was left out (not only a part of it).
    pub whole: bool,
    /// Where it was read from, when that is a file (`--objects`).
    pub origin: Option<String>,
    pub reason: String,
}

impl Skipped {
    /// The whole object was left out.
    pub fn object(kind: SkippedKind, object: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { kind, object: object.into(), whole: true, origin: None, reason: reason.into() }
    }

    /// A part of the object was left out; the rest is used.
    pub fn part(kind: SkippedKind, object: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { whole: false, ..Self::object(kind, object, reason) }
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind == SkippedKind::Document {
            return write!(f, "{}: {}", self.object, self.reason);
        }
        write!(f, "{} {}", self.kind.as_str(), self.object)?;
        if self.whole {
            f.write_str(" skipped")?;
        }
        if let Some(origin) = &self.origin {
            write!(f, " ({origin})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// The YAML files under `path` (itself if a file), in name order so that results are deterministic.
pub fn files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let p = entry?.path();
        let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"));
        if yaml && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every object under `path`. Fails only when the path itself cannot be read.
pub fn load(path: &Path) -> Result<Objects> {
    let mut objects = Objects::default();
    for file in files(path)? {
        let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        parse_into(&text, &file.display().to_string(), &mut objects);
    }
    Ok(objects)
}

/// Parses a multi-document YAML text into `objects`.
pub fn parse_into(text: &str, origin: &str, objects: &mut Objects) {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                let document = format!("{origin} document {index}");
                objects.errors.push(Skipped::object(SkippedKind::Document, document, format!("invalid YAML: {e}")));
                // A syntax error ends the stream: nothing after it can be read reliably.
                break;
            }
        };
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let meta =
            |name: &str| value.get("metadata").and_then(|m| m.get(name)).and_then(|v| v.as_str()).map(str::to_owned);
        let object =
            format!("{}/{}", meta("namespace").unwrap_or_else(|| "default".into()), meta("name").unwrap_or_default());
        let result = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => serde_yaml::from_value(value).map(|s| objects.services.push(Arc::new(s))),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                serde_yaml::from_value(value).map(|s| objects.slices.push(Arc::new(s)))
            }
            ("v1", "Node") => serde_yaml::from_value(value).map(|n| objects.nodes.push(Arc::new(n))),
            ("v1", "List") => {
                // `kubectl get -o yaml` output: recurse into the items.
                if let Some(items) = value.get("items").and_then(|v| v.as_sequence()) {
                    for item in items {
                        let text = serde_yaml::to_string(item).unwrap_or_default();
                        parse_into(&text, origin, objects);
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            let kind = match kind.as_str() {
                "Service" => SkippedKind::Service,
                "EndpointSlice" => SkippedKind::EndpointSlice,
                _ => SkippedKind::Node,
            };
            let mut skipped = Skipped::object(kind, object, e.to_string());
            skipped.origin = Some(format!("{origin} document {index}"));
            objects.errors.push(skipped);
        }
    }
}
