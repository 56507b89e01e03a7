//! Errors that name the key (or the line) that was wrong.

use super::ConfigError;

pub(super) fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    // toml's Display spans several lines (it quotes the source); a single
    // line with the position reads better in logs.
    let line_col = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        (line, col)
    });
    ConfigError {
        origin: origin.to_owned(),
        key: None,
        line_col,
        message: format!(
            "invalid TOML: {}",
            e.message().trim().lines().collect::<Vec<_>>().join("; ")
        ),
    }
}

/// Renders a serde_path_to_error path as `listener[0].bind[1]`, or `None`
/// for the document root.
pub(super) fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => push_key(&mut out, key),
            Segment::Unknown => push_key(&mut out, "?"),
        }
    }
    (!out.is_empty()).then_some(out)
}

pub(super) fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}
