//! Config loading with `${VAR}` interpolation, with a fuzzer-chosen
//! environment.
//!
//! Input: a config file. Its leading lines of the form `#! NAME=VALUE` (TOML
//! comments, so the file stays valid) are the environment; every other
//! variable is unset. Checks, besides no panic in parsing and in rendering
//! the error: a config that parsed keeps the promise of `Config::parse`
//! that `listener_backend` cannot fail, and parsing is deterministic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use proxy::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env: HashMap<&str, &str> = text
        .lines()
        .map_while(|l| l.strip_prefix("#! "))
        .filter_map(|l| l.split_once('='))
        .collect();
    let lookup = |name: &str| env.get(name).map(|v| v.to_string());
    match Config::parse(text, "fuzz.toml", &lookup) {
        Ok(config) => {
            for listener in &config.listeners {
                let backend = config.listener_backend(listener);
                assert_eq!(backend.name, listener.backend);
            }
            let again = Config::parse(text, "fuzz.toml", &lookup).expect("parses twice");
            assert_eq!(format!("{again:?}"), format!("{config:?}"));
        }
        Err(err) => {
            let rendered = err.to_string();
            assert!(rendered.starts_with("fuzz.toml"), "{rendered}");
            if let Some((line, col)) = err.line_col() {
                assert!(line >= 1 && col >= 1, "{line}:{col}");
                assert!(line <= text.lines().count() + 1, "line {line} past the end");
            }
        }
    }
});
