//! Helm values: the app's `deployment/values.yaml` with Altinn's layout (everything under a
//! top-level `deployment:` key) hoisted to the top, then overrides set by dotted paths as
//! `helm --set` spells them.

use serde_json::{Map, Value};

use super::{DeployError, Result};

/// A values tree (a YAML mapping).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Values(pub Map<String, Value>);

impl Values {
    /// Parse a values file. An empty file is empty values. When the top level has a
    /// `deployment:` mapping (Altinn's app repositories), its entries are hoisted to the top
    /// level, as Altinn's deploy pipeline does; other top-level keys stay, and the hoisted
    /// entries win where both name the same key.
    pub fn parse(text: &str, what: &str) -> Result<Values> {
        if text.trim().is_empty() {
            return Ok(Values::default());
        }
        let v: Value = serde_saphyr::from_str(text).map_err(|e| DeployError::yaml(what, e))?;
        let mut map = match v {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => return Err(DeployError::invalid(what, "values must be a YAML mapping")),
        };
        if let Some(Value::Object(inner)) = map.get("deployment").cloned() {
            map.remove("deployment");
            let mut out = Values(map);
            out.merge(Value::Object(inner));
            return Ok(out);
        }
        Ok(Values(map))
    }

    /// Deep-merge `other` into these values: mappings merge key by key, anything else
    /// (scalars, lists) replaces what was there — Helm's rule for values files.
    pub fn merge(&mut self, other: Value) {
        if let Value::Object(m) = other {
            merge_maps(&mut self.0, m);
        }
    }

    /// Set `path` (`image.tag`, `podAnnotations.altinn\.studio/deployment-id`, `env[0].name`)
    /// to `value`, creating mappings and list slots on the way.
    pub fn set(&mut self, path: &str, value: Value) -> Result<()> {
        let keys = split_path(path)?;
        let (last, parents) = keys
            .split_last()
            .expect("split_path returns at least one key");
        let mut root = Value::Object(std::mem::take(&mut self.0));
        set_in(&mut root, parents, last, value);
        if let Value::Object(m) = root {
            self.0 = m;
        }
        Ok(())
    }

    /// The value at a dotted path, if any.
    pub fn get(&self, path: &str) -> Option<&Value> {
        let keys = split_path(path).ok()?;
        let mut cur: Option<&Value> = None;
        for (i, k) in keys.iter().enumerate() {
            cur = match (i, k, cur) {
                (0, Key::Name(n), _) => self.0.get(n),
                (_, Key::Name(n), Some(Value::Object(m))) => m.get(n),
                (_, Key::Index(ix), Some(Value::Array(a))) => a.get(*ix),
                _ => None,
            };
            cur?;
        }
        cur
    }

    /// Set (or replace) the environment variable `name` in the list at `key` (Kubernetes'
    /// `EnvVar` shape: `- name: N` / `value: V`), keeping the other entries in order.
    pub fn set_env(&mut self, key: &str, name: &str, value: &str) -> Result<()> {
        let list = match self.get(key) {
            Some(Value::Array(a)) => a.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                return Err(DeployError::invalid(
                    format!("values {key}"),
                    "expected a list of {name, value} entries",
                ));
            }
        };
        let entry = serde_json::json!({"name": name, "value": value});
        let mut list: Vec<Value> = list;
        match list.iter_mut().find(|e| e["name"] == name) {
            Some(e) => *e = entry,
            None => list.push(entry),
        }
        self.set(key, Value::Array(list))
    }

    /// The values as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

fn merge_maps(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_maps(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn set_in(slot: &mut Value, keys: &[Key], last: &Key, value: Value) {
    let Some((first, tail)) = keys.split_first() else {
        // `slot` is where `last` goes.
        match last {
            Key::Name(k) => {
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                slot.as_object_mut()
                    .expect("made an object above")
                    .insert(k.clone(), value);
            }
            Key::Index(i) => {
                array_slot(slot, *i)[*i] = value;
            }
        }
        return;
    };
    let next = match first {
        Key::Name(k) => {
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            slot.as_object_mut()
                .expect("made an object above")
                .entry(k.clone())
                .or_insert(Value::Null)
        }
        Key::Index(i) => &mut array_slot(slot, *i)[*i],
    };
    set_in(next, tail, last, value)
}

/// `slot` as a list at least `i + 1` long (helm pads with nulls).
fn array_slot(slot: &mut Value, i: usize) -> &mut Vec<Value> {
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    let a = slot.as_array_mut().expect("made an array above");
    if a.len() <= i {
        a.resize(i + 1, Value::Null);
    }
    a
}

#[derive(Clone, Debug, PartialEq)]
enum Key {
    Name(String),
    Index(usize),
}

/// Largest list index `--set` may create (helm's own limit is 65536).
const MAX_INDEX: usize = 65_536;

/// `a.b\.c[2].d` → `a`, `b.c`, `[2]`, `d`.
fn split_path(path: &str) -> Result<Vec<Key>> {
    let bad = |msg: &str| DeployError::invalid(format!("--set {path}"), msg);
    let mut keys = Vec::new();
    let mut cur = String::new();
    let mut chars = path.chars().peekable();
    let mut after_index = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => return Err(bad("trailing backslash")),
            },
            '.' => {
                if cur.is_empty() && !after_index {
                    return Err(bad("empty key"));
                }
                if !cur.is_empty() {
                    keys.push(Key::Name(std::mem::take(&mut cur)));
                }
                after_index = false;
            }
            '[' => {
                if !cur.is_empty() {
                    keys.push(Key::Name(std::mem::take(&mut cur)));
                }
                let mut n = String::new();
                for d in chars.by_ref() {
                    if d == ']' {
                        break;
                    }
                    n.push(d);
                }
                let i: usize = n.parse().map_err(|_| bad("invalid list index"))?;
                if i > MAX_INDEX {
                    return Err(bad("list index too large"));
                }
                keys.push(Key::Index(i));
                after_index = true;
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        keys.push(Key::Name(cur));
    }
    if keys.is_empty() || matches!(keys.first(), Some(Key::Index(_))) {
        return Err(bad("a path must start with a key"));
    }
    Ok(keys)
}

/// Parse one `--set key.path=value`. The value is typed as `helm --set` types it: `true`,
/// `false`, `null` and integers become those; `{a,b}` is a list; anything else is a string.
///
/// Unlike helm, one `--set` is one assignment (commas are not separators): values such as
/// JSON scope lists keep their commas. Repeat `--set` for several.
pub fn parse_set(s: &str) -> Result<(String, Value)> {
    let (k, v) = s
        .split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| DeployError::invalid(format!("--set {s}"), "expected key.path=value"))?;
    split_path(k)?;
    Ok((k.to_string(), typed(v)))
}

fn typed(v: &str) -> Value {
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        _ if v.len() >= 2 && v.starts_with('{') && v.ends_with('}') => Value::Array(
            v[1..v.len() - 1]
                .split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(typed)
                .collect(),
        ),
        _ => match v.parse::<i64>() {
            // helm keeps numbers with a leading zero as strings ("007").
            Ok(n) if !(v.len() > 1 && (v.starts_with('0') || v.starts_with("-0"))) => {
                Value::from(n)
            }
            _ => Value::String(v.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployment_key_is_hoisted() {
        let v = Values::parse(
            "deployment:\n  replicaCount: 3\n  image:\n    repository: old\nother: 1\n",
            "values.yaml",
        )
        .unwrap();
        assert_eq!(
            v.to_value(),
            json!({"replicaCount": 3, "image": {"repository": "old"}, "other": 1})
        );
        assert_eq!(Values::parse("", "x").unwrap(), Values::default());
        assert_eq!(
            Values::parse("# only a comment\n", "x").unwrap(),
            Values::default()
        );
        assert!(Values::parse("- a\n- b\n", "x").is_err());
        assert!(Values::parse("a: [\n", "x").is_err());
    }

    #[test]
    fn set_creates_paths_and_types_values() {
        let mut v = Values::parse("image:\n  repository: a\n  pullPolicy: Always\n", "x").unwrap();
        for s in [
            "image.tag=v1",
            "replicaCount=2",
            "enabled=true",
            "zip=007",
            r"podAnnotations.altinn\.studio/deployment-id=42",
            "hosts[1].name=b",
            "list={a, 2}",
            "scopes=[\"a:b\",\"c:d\"]",
        ] {
            let (k, val) = parse_set(s).unwrap();
            v.set(&k, val).unwrap();
        }
        assert_eq!(
            v.to_value(),
            json!({
                "image": {"repository": "a", "pullPolicy": "Always", "tag": "v1"},
                "replicaCount": 2,
                "enabled": true,
                "zip": "007",
                "podAnnotations": {"altinn.studio/deployment-id": 42},
                "hosts": [null, {"name": "b"}],
                "list": ["a", 2],
                "scopes": "[\"a:b\",\"c:d\"]",
            })
        );
        assert_eq!(v.get("hosts[1].name"), Some(&json!("b")));
        assert!(parse_set("=x").is_err());
        assert!(parse_set("a..b=x").is_err());
        assert!(parse_set("[0]=x").is_err());
        assert!(parse_set("noequals").is_err());
    }

    #[test]
    fn merge_is_deep_and_env_entries_replace_by_name() {
        let mut v = Values::parse("a:\n  b: 1\n  c: [1, 2]\n", "x").unwrap();
        v.merge(json!({"a": {"c": [3], "d": 4}}));
        assert_eq!(v.to_value(), json!({"a": {"b": 1, "c": [3], "d": 4}}));
        v.set_env("env", "A", "1").unwrap();
        v.set_env("env", "B", "2").unwrap();
        v.set_env("env", "A", "3").unwrap();
        assert_eq!(
            v.get("env"),
            Some(&json!([{"name": "A", "value": "3"}, {"name": "B", "value": "2"}]))
        );
        assert!(v.set_env("a", "X", "1").is_err());
    }
}
