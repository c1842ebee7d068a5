//! The config as a JSON tree: a dotted key's slot, a value typed on a command line parsed
//! like the value it replaces, and a JSON patch merged key by key (for `config set` and
//! `PATCH /api/v1/config`).

use super::ConfigError;

pub(super) fn lookup_mut<'a>(
    tree: &'a mut serde_json::Value,
    key: &str,
) -> Option<&'a mut serde_json::Value> {
    key.split('.')
        .try_fold(tree, |node, part| node.as_object_mut()?.get_mut(part))
}

pub(super) fn parse_like(
    current: &serde_json::Value,
    raw: &str,
) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    Ok(match current {
        Value::Bool(_) => Value::Bool(
            raw.parse()
                .map_err(|_| format!("{raw:?} is not true or false"))?,
        ),
        Value::Number(n) if n.is_f64() => {
            let v: f64 = raw
                .parse()
                .map_err(|_| format!("{raw:?} is not a number"))?;
            serde_json::Number::from_f64(v)
                .map(Value::Number)
                .ok_or("not a finite number")?
        }
        Value::Number(_) => Value::Number(
            raw.parse::<u64>()
                .map_err(|_| format!("{raw:?} is not a non-negative integer"))?
                .into(),
        ),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        Value::Object(_) => return Err("is a section, set one of its keys".into()),
        _ => Value::String(raw.into()),
    })
}

pub(super) fn merge(
    tree: &mut serde_json::Value,
    patch: &serde_json::Value,
    prefix: &str,
    changed: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let patch = patch.as_object().ok_or_else(|| ConfigError::Invalid {
        key: if prefix.is_empty() {
            "<body>".into()
        } else {
            prefix.into()
        },
        message: "must be a JSON object".into(),
    })?;
    for (k, v) in patch {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let slot = tree
            .as_object_mut()
            .and_then(|o| o.get_mut(k))
            .ok_or_else(|| ConfigError::UnknownKey(key.clone()))?;
        if slot.is_object() {
            merge(slot, v, &key, changed)?;
        } else {
            let same_kind = matches!(
                (&*slot, v),
                (serde_json::Value::Bool(_), serde_json::Value::Bool(_))
                    | (serde_json::Value::Number(_), serde_json::Value::Number(_))
                    | (serde_json::Value::String(_), serde_json::Value::String(_))
                    | (serde_json::Value::Array(_), serde_json::Value::Array(_))
            );
            if !same_kind {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("expected {}, got {}", kind(slot), kind(v)),
                });
            }
            if slot != v {
                *slot = v.clone();
                changed.push(key);
            }
        }
    }
    Ok(())
}

pub(super) fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
