//! Manifests in, manifests out, with every image pinned by digest — `ko resolve`'s job
//! (<https://ko.build/reference/ko_resolve/>): `strata://NAME` placeholders anywhere in a
//! string, and `image:` fields naming an image given with `--image NAME=REF`, become
//! `registry/repo@sha256:…`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{DeployError, Result};

/// The placeholder scheme.
pub const SCHEME: &str = "strata://";

/// Image name (as written in manifests, or after `strata://`) → pinned reference.
pub type ImageMap = BTreeMap<String, String>;

/// Parse a stream of YAML documents (`---`-separated). Empty documents are dropped; every
/// other document must be a mapping (a Kubernetes object). A `kind: List` is flattened into
/// its items, as kubectl does.
pub fn parse_manifests(text: &str, what: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| DeployError::yaml(what, e))?;
    let mut out = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        match d {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind") == Some(&Value::from("List")) => {
                if let Some(Value::Array(items)) = m.get("items") {
                    out.extend(items.iter().cloned());
                }
            }
            Value::Object(_) => out.push(d),
            _ => {
                return Err(DeployError::invalid(
                    what,
                    format!("document {} is not a mapping", i + 1),
                ));
            }
        }
    }
    for (i, d) in out.iter().enumerate() {
        if !d["apiVersion"].is_string() || !d["kind"].is_string() {
            return Err(DeployError::invalid(
                what,
                format!("document {} has no apiVersion and kind", i + 1),
            ));
        }
    }
    Ok(out)
}

/// Every `strata://NAME` placeholder in `docs` (the NAMEs).
pub fn placeholders(docs: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in docs {
        walk(d, &mut |s, _| {
            if let Some(name) = s.strip_prefix(SCHEME) {
                out.insert(name.to_string());
            }
        });
    }
    out
}

fn walk(v: &Value, f: &mut impl FnMut(&str, Option<&str>)) {
    fn go(v: &Value, key: Option<&str>, f: &mut impl FnMut(&str, Option<&str>)) {
        match v {
            Value::String(s) => f(s, key),
            Value::Array(a) => a.iter().for_each(|x| go(x, key, f)),
            Value::Object(m) => m.iter().for_each(|(k, x)| go(x, Some(k), f)),
            _ => {}
        }
    }
    go(v, None, f)
}

/// Whether `image` (as written in a manifest) names `name`: the same repository, with or
/// without a tag or digest (kustomize's `images:` rule).
fn names(image: &str, name: &str) -> bool {
    image == name
        || image
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
}

/// Replace images in `docs`: each `strata://NAME` string by `map[NAME]`, and each `image:`
/// value naming a key of `map` by its value. Returns the replacements made (old → new), in
/// order; an unknown placeholder is an error.
pub fn resolve_images(docs: &mut [Value], map: &ImageMap) -> Result<Vec<(String, String)>> {
    fn go(
        v: &mut Value,
        key: Option<&str>,
        map: &ImageMap,
        done: &mut Vec<(String, String)>,
    ) -> Result<()> {
        match v {
            Value::String(s) => {
                let new = if let Some(name) = s.strip_prefix(SCHEME) {
                    Some(
                        map.get(name)
                            .cloned()
                            .ok_or_else(|| DeployError::UnknownImage {
                                name: name.to_string(),
                            })?,
                    )
                } else if key == Some("image") {
                    map.iter()
                        .find(|(n, _)| names(s, n))
                        .map(|(_, r)| r.clone())
                } else {
                    None
                };
                if let Some(new) = new {
                    done.push((std::mem::replace(s, new.clone()), new));
                }
            }
            Value::Array(a) => {
                for x in a {
                    go(x, key, map, done)?;
                }
            }
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    go(x, Some(k), map, done)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    let mut done = Vec::new();
    for d in docs {
        go(d, None, map, &mut done)?;
    }
    Ok(done)
}

/// Documents as a YAML stream (`---` between documents), keys sorted. Long strings (image
/// references, URLs) stay on one line rather than folded, so the output greps and diffs like
/// kubectl's; strings with newlines become literal blocks.
pub fn to_yaml(docs: &[Value]) -> String {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    options.min_fold_chars = usize::MAX;
    let mut out = String::new();
    for d in docs {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        let text = serde_saphyr::to_string_with_options(d, options.clone())
            .expect("a JSON value serialises as YAML");
        out.push_str(&text);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// `kind/name` (with `namespace/` in front when set), for messages.
pub fn describe(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap_or("object").to_lowercase();
    let name = obj["metadata"]["name"].as_str().unwrap_or("?");
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{kind}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn placeholders_and_named_images_are_pinned() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\nspec:\n  template:\n    spec:\n      containers:\n      - name: app\n        image: strata://app\n      - name: side\n        image: ghcr.io/org/side:1.0\n      - name: other\n        image: ghcr.io/org/sidecar:2\n      initContainers:\n      - name: init\n        image: busybox\n        args: [\"strata://app\"]\n---\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: app\n";
        let mut docs = parse_manifests(text, "m.yaml").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(placeholders(&docs), BTreeSet::from(["app".to_string()]));
        let map: ImageMap = [
            ("app".to_string(), format!("r.example/app@{DIGEST}")),
            (
                "ghcr.io/org/side".to_string(),
                format!("ghcr.io/org/side@{DIGEST}"),
            ),
        ]
        .into();
        let done = resolve_images(&mut docs, &map).unwrap();
        assert_eq!(done.len(), 3);
        let c = &docs[0]["spec"]["template"]["spec"]["containers"];
        assert_eq!(c[0]["image"], format!("r.example/app@{DIGEST}"));
        assert_eq!(c[1]["image"], format!("ghcr.io/org/side@{DIGEST}"));
        assert_eq!(c[2]["image"], "ghcr.io/org/sidecar:2");
        let init = &docs[0]["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(init["args"][0], format!("r.example/app@{DIGEST}"));
        assert_eq!(init["image"], "busybox");
        let yaml = to_yaml(&docs);
        let back = parse_manifests(&yaml, "out").unwrap();
        assert_eq!(back, docs);
        assert_eq!(describe(&docs[1]), "service/app");
        assert!(
            yaml.contains(&format!("image: r.example/app@{DIGEST}\n")),
            "{yaml}"
        );
    }

    #[test]
    fn unknown_placeholders_and_non_objects_fail() {
        let mut docs = parse_manifests(
            "apiVersion: v1\nkind: Pod\nspec: {image: \"strata://x\"}\n",
            "m",
        )
        .unwrap();
        let e = resolve_images(&mut docs, &ImageMap::new()).unwrap_err();
        assert!(e.to_string().contains("--image x=REF"), "{e}");
        assert!(parse_manifests("- a\n", "m").is_err());
        assert!(parse_manifests("a: 1\n", "m").is_err());
        let text = to_yaml(&[serde_json::json!({"a": "x".repeat(200), "b": "l1\nl2\n"})]);
        assert!(
            text.contains(&format!("a: {}\n", "x".repeat(200))),
            "{text}"
        );
        assert!(text.contains("b: |"), "{text}");
        let list = parse_manifests(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n",
            "m",
        )
        .unwrap();
        assert_eq!(list.len(), 1);
    }
}
