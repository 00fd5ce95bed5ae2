//! The configuration reference (docs/config-reference.md), generated from
//! the config types: their JSON Schema (doc comments become descriptions)
//! and the values of [`Config::default`].
//!
//! `qvl config reference` prints it, `cargo xtask config-reference` writes
//! it, and a test fails when the checked-in file is out of date.

use crate::config::Config;
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// The JSON Schema of the whole configuration (for editors and validators).
pub fn json_schema() -> Value {
    schemars::schema_for!(Config).to_value()
}

/// The configuration reference as Markdown.
pub fn markdown() -> String {
    let schema = json_schema();
    let defaults = serde_json::to_value(Config::default()).unwrap_or(Value::Null);
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = String::new();
    out.push_str(
        "# Configuration reference\n\n\
         Generated from the config types by `cargo xtask config-reference` (the same text as \
         `qvl config reference`); a test fails when this file is out of date. Do not edit it by hand: \
         edit the doc comments in `crates/qvl-runtime/src/config.rs` (and `qvl-metrics`'s `MetricsConfig`).\n\n\
         Layers, lowest first: the defaults below, a TOML file (`qvl run --config FILE`), and environment \
         variables `QVL_<SECTION>__<KEY>` (for example `QVL_SWAPPING__MEMORY_THRESHOLD=0.9`). \
         `qvl config show` prints every value with the layer it came from; `qvl config check FILE` \
         validates a file. Unknown keys, wrong types and out-of-range values are errors that name the key \
         and the source. `configs/default.toml` and `configs/laptop-sm61.toml` are commented examples.\n",
    );
    let root = Section {
        defs: &defs,
        out: &mut out,
    };
    root.render_properties(&[], &schema, &defaults);
    out
}

struct Section<'a> {
    defs: &'a Map<String, Value>,
    out: &'a mut String,
}

impl Section<'_> {
    /// Follows `$ref`s into `$defs`.
    fn resolve<'v>(&'v self, schema: &'v Value) -> &'v Value {
        let mut s = schema;
        for _ in 0..8 {
            match s.get("$ref").and_then(Value::as_str) {
                Some(r) => match r.strip_prefix("#/$defs/").and_then(|n| self.defs.get(n)) {
                    Some(d) => s = d,
                    None => break,
                },
                None => break,
            }
        }
        s
    }

    /// Whether a property is a nested table with its own keys (a struct).
    fn is_struct(&self, schema: &Value) -> bool {
        self.resolve(schema).get("properties").is_some()
    }

    /// A map from names to structs (`specialized_pools`), rendered as `<name>` tables.
    fn map_of_structs<'v>(&'v self, schema: &'v Value) -> Option<&'v Value> {
        let items = self.resolve(schema).get("additionalProperties")?;
        self.is_struct(items).then_some(items)
    }

    fn render_properties(self, path: &[String], schema: &Value, defaults: &Value) {
        let schema = self.resolve(schema).clone();
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        let mut scalars = Vec::new();
        let mut nested = Vec::new();
        for (key, prop) in props {
            if self.is_struct(prop) || self.map_of_structs(prop).is_some() {
                nested.push((key, prop));
            } else {
                scalars.push((key, prop));
            }
        }
        if !scalars.is_empty() {
            let _ = writeln!(self.out, "\n| key | type | default | description |");
            let _ = writeln!(self.out, "|---|---|---|---|");
            for (key, prop) in scalars {
                let default = defaults.get(key).unwrap_or(&Value::Null);
                let env = if path.is_empty() || path.iter().any(|p| p.starts_with('<')) {
                    String::new()
                } else {
                    format!(
                        " Env: `QVL_{}__{}`.",
                        path.join("__").to_uppercase(),
                        key.to_uppercase()
                    )
                };
                let _ = writeln!(
                    self.out,
                    "| `{key}` | {} | {} | {}{env} |",
                    self.type_name(prop),
                    default_text(default),
                    cell(&self.description(prop)),
                );
            }
        }
        for (key, prop) in nested {
            let mut sub = path.to_vec();
            sub.push(key.clone());
            let default = defaults.get(key).unwrap_or(&Value::Null);
            if let Some(items) = self.map_of_structs(prop) {
                let items = items.clone();
                let level = "#".repeat((sub.len() + 1).min(6));
                let _ = writeln!(self.out, "\n{level} `[{}]`\n", sub.join("."));
                let _ = writeln!(self.out, "{}", self.description(prop));
                if let Some(entries) = default.as_object().filter(|m| !m.is_empty()) {
                    let names: Vec<String> = entries.keys().map(|k| format!("`{k}`")).collect();
                    let _ = writeln!(self.out, "\nDefault entries: {}.", names.join(", "));
                }
                sub.push("<name>".to_string());
                let level = "#".repeat((sub.len() + 1).min(6));
                let _ = writeln!(self.out, "\n{level} `[{}]`", sub.join("."));
                let first = default
                    .as_object()
                    .and_then(|m| m.values().next())
                    .cloned()
                    .unwrap_or(Value::Null);
                let _ = writeln!(
                    self.out,
                    "\nOne entry; the default column shows the first default entry."
                );
                Section {
                    defs: self.defs,
                    out: self.out,
                }
                .render_properties(&sub, &items, &first);
            } else {
                let level = "#".repeat((sub.len() + 1).min(6));
                let _ = writeln!(self.out, "\n{level} `[{}]`\n", sub.join("."));
                let _ = writeln!(self.out, "{}", self.description(prop));
                Section {
                    defs: self.defs,
                    out: self.out,
                }
                .render_properties(&sub, prop, default);
            }
        }
    }

    /// The field's doc comment, else its type's; enums list their values.
    fn description(&self, prop: &Value) -> String {
        let own = prop.get("description").and_then(Value::as_str);
        let target = self.resolve(prop);
        let inner = nullable_inner(target)
            .map(|s| self.resolve(s))
            .unwrap_or(target);
        let text = own
            .or_else(|| inner.get("description").and_then(Value::as_str))
            .unwrap_or("")
            .to_string();
        let variants = enum_variants(inner);
        if variants.iter().any(|(_, d)| !d.is_empty()) {
            let list: Vec<String> = variants
                .iter()
                .map(|(v, d)| format!("`{v}`: {}", d.trim_end_matches('.')))
                .collect();
            format!("{text} Values: {}.", list.join("; "))
        } else {
            text
        }
    }

    fn type_name(&self, prop: &Value) -> String {
        if let Some(name) = ref_name(prop) {
            match name {
                "ByteSize" => return "size".into(),
                "HumanDuration" => return "duration".into(),
                _ => {}
            }
        }
        let s = self.resolve(prop);
        if let Some(inner) = nullable_inner(s) {
            return format!("{}, optional", self.type_name(inner));
        }
        let variants = enum_variants(s);
        if !variants.is_empty() {
            let names: Vec<String> = variants.iter().map(|(v, _)| format!("`{v}`")).collect();
            return format!("one of {}", names.join(", "));
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(ts)) => {
                let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
                if names.contains(&"null") {
                    let rest: Vec<&str> = names.into_iter().filter(|t| *t != "null").collect();
                    return format!("{}, optional", simple_type(&rest.join(" or "), s));
                }
                names.join(" or ")
            }
            _ => String::new(),
        };
        match ty.as_str() {
            "array" => match s.get("items") {
                Some(items) => {
                    let item = self.type_name(items);
                    match item.strip_prefix("one of ") {
                        Some(values) => format!("list of {values}"),
                        None => format!("list of {item}"),
                    }
                }
                None => "list".into(),
            },
            "object" => match s.get("additionalProperties") {
                Some(v @ Value::Object(_)) => {
                    let key = s
                        .get("propertyNames")
                        .map(|k| self.type_name(k))
                        .unwrap_or_else(|| "string".into());
                    format!("table of {key} to {}", self.type_name(v))
                }
                _ => "table".into(),
            },
            other => simple_type(other, s),
        }
    }
}

fn simple_type(ty: &str, schema: &Value) -> String {
    match (ty, schema.get("format").and_then(Value::as_str)) {
        ("boolean", _) => "bool".into(),
        ("integer", Some(f)) if f.starts_with('u') => "non-negative integer".into(),
        ("integer", _) => "integer".into(),
        ("number", _) => "number".into(),
        ("string", Some("ip")) => "IP address".into(),
        ("string", _) => "string".into(),
        ("string or integer", _) => "size".into(),
        (other, _) => other.to_string(),
    }
}

fn ref_name(prop: &Value) -> Option<&str> {
    prop.get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
}

/// `Option<T>`: schemars writes `anyOf: [T, {type: null}]`.
fn nullable_inner(schema: &Value) -> Option<&Value> {
    let any = schema.get("anyOf")?.as_array()?;
    if any.len() != 2 {
        return None;
    }
    let is_null = |v: &Value| v.get("type").and_then(Value::as_str) == Some("null");
    match (is_null(&any[0]), is_null(&any[1])) {
        (false, true) => Some(&any[0]),
        (true, false) => Some(&any[1]),
        _ => None,
    }
}

/// The values of a unit-variant enum with their doc comments.
fn enum_variants(schema: &Value) -> Vec<(String, String)> {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .filter_map(Value::as_str)
            .map(|v| (v.to_string(), String::new()))
            .collect();
    }
    let Some(one_of) = schema.get("oneOf").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in one_of {
        let description = v
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(c) = v.get("const").and_then(Value::as_str) {
            out.push((c.to_string(), description));
        } else if let Some(values) = v.get("enum").and_then(Value::as_array) {
            for c in values.iter().filter_map(Value::as_str) {
                out.push((c.to_string(), description.clone()));
            }
        } else {
            return Vec::new();
        }
    }
    out
}

fn default_text(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        Value::Object(m) if m.is_empty() => "`{}`".into(),
        Value::String(s) => format!("`\"{s}\"`"),
        other => format!("`{}`", other.to_string().replace(',', ", ")),
    }
}

fn cell(s: &str) -> String {
    // Rustdoc links ("[`name`]") read as plain code here.
    s.replace("[`", "`")
        .replace("`]", "`")
        .replace('|', "\\|")
        .replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in reference must match the config types.
    #[test]
    fn docs_config_reference_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/config-reference.md"
        );
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        let generated = markdown();
        assert!(
            on_disk == generated,
            "docs/config-reference.md is out of date with the config types: run `cargo xtask config-reference` and commit the file"
        );
    }

    #[test]
    fn reference_covers_every_section_and_key() {
        let md = markdown();
        for section in [
            "memory_pooling",
            "caching",
            "compression",
            "swapping",
            "tiering",
            "garbage_collection",
            "hardware",
            "metrics",
            "metrics.dashboard",
            "metrics.dashboard.alerts",
            "memory_pooling.specialized_pools.<name>",
        ] {
            assert!(
                md.contains(&format!("`[{section}]`")),
                "missing [{section}]:\n{md}"
            );
        }
        assert!(
            md.contains("| `memory_threshold` | number | `0.8` |"),
            "{md}"
        );
        assert!(
            md.contains("| `max_pool_size` | size | `\"2GiB\"` |"),
            "{md}"
        );
        assert!(
            md.contains("| `collection_interval` | duration | `\"100ms\"` |"),
            "{md}"
        );
        assert!(md.contains("`s3_fifo`"), "enum values are listed: {md}");
        assert!(md.contains("Env: `QVL_SWAPPING__MEMORY_THRESHOLD`"), "{md}");
        assert!(
            md.contains("| `swap_directory` | string, optional | unset |"),
            "{md}"
        );
    }
}
