//! `[defaults]`: copied into every listener and backend table that does not
//! set the key, before the tree is deserialized.

use super::{Defaults, error::key_path};

impl Defaults {
    /// Keys of `[defaults]` that go to each `[[listener]]`, and to each
    /// `[[backend]]`.
    const LISTENER_KEYS: [&str; 4] = [
        "client_timeout",
        "http_request_timeout",
        "tunnel_timeout",
        "max_header_size",
    ];
    const BACKEND_KEYS: [&str; 2] = ["connect_timeout", "server_timeout"];

    /// Copies the `[defaults]` values into every listener and backend table
    /// of `tree` that does not set them, after checking them on their own
    /// (so that a bad value is reported under `defaults.`).
    pub(super) fn apply(tree: &mut toml::Value) -> Result<(), (String, String)> {
        let Some(defaults) = tree.get("defaults").cloned() else {
            return Ok(());
        };
        serde_path_to_error::deserialize::<_, Defaults>(defaults.clone()).map_err(|e| {
            let key = key_path(e.path()).map_or("defaults".into(), |k| format!("defaults.{k}"));
            (key, e.inner().message().to_owned())
        })?;
        for (section, keys) in [
            ("listener", &Self::LISTENER_KEYS[..]),
            ("backend", &Self::BACKEND_KEYS[..]),
        ] {
            let Some(toml::Value::Array(tables)) = tree.get_mut(section) else {
                continue;
            };
            for table in tables.iter_mut().filter_map(toml::Value::as_table_mut) {
                for key in keys {
                    if let Some(value) = defaults.get(*key)
                        && !table.contains_key(*key)
                    {
                        table.insert((*key).to_string(), value.clone());
                    }
                }
            }
        }
        Ok(())
    }
}
