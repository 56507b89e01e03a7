//! `${VAR}` and `${VAR:-default}` inside string values, expanded after
//! parsing (never textual substitution), so a variable cannot inject TOML.

use super::error::push_key;

/// Expands variable references in every string value of `value`, in place.
/// `path` is the key path of `value` and is restored before returning.
/// Errors are (key path, message).
pub(super) fn interpolate_tree(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    let len = path.len();
    let result = match value {
        toml::Value::String(s) => match interpolate(s, env) {
            Ok(expanded) => {
                *s = expanded;
                Ok(())
            }
            Err(message) => Err((path.clone(), message)),
        },
        toml::Value::Array(items) => items.iter_mut().enumerate().try_for_each(|(i, item)| {
            path.push_str(&format!("[{i}]"));
            let r = interpolate_tree(item, path, env);
            path.truncate(len);
            r
        }),
        toml::Value::Table(table) => table.iter_mut().try_for_each(|(key, item)| {
            push_key(path, key);
            let r = interpolate_tree(item, path, env);
            path.truncate(len);
            r
        }),
        // Numbers, booleans and dates have no place for references.
        _ => Ok(()),
    };
    path.truncate(len);
    result
}

/// Expands `${VAR}` and `${VAR:-default}` in `s`; `$${` stands for a literal
/// `${` and any other `$` is kept as is. Substituted values are not expanded
/// again, so a variable's content is always taken literally.
pub(super) fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let Some(close) = after.find('}') else {
                return Err(format!(
                    "unterminated \"${{\" in {s:?}: expected ${{VAR}} or ${{VAR:-default}} \
                     (write $${{ for a literal \"${{\")"
                ));
            };
            out.push_str(&expand_reference(&after[..close], env)?);
            rest = &after[close + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Resolves the inside of one `${...}`.
pub(super) fn expand_reference(
    inner: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let (name, default) = match inner.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (inner, None),
    };
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!(
            "invalid variable reference \"${{{inner}}}\": expected ${{VAR}} or ${{VAR:-default}} \
             where VAR is letters, digits and _ (write $${{ for a literal \"${{\")"
        ));
    }
    match (env(name), default) {
        // Like the shell's `:-`, an empty value also selects the default, so
        // `export VAR=` behaves like an unset variable.
        (Some(v), Some(d)) if v.is_empty() => Ok(d.to_owned()),
        (Some(v), _) => Ok(v),
        (None, Some(d)) => Ok(d.to_owned()),
        (None, None) => Err(format!(
            "environment variable {name} is not set (use ${{{name}:-default}} for a default)"
        )),
    }
}
