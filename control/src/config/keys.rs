//! What the daemon says about configuration keys: which take effect only after a restart,
//! and how a database URL is shown without its password.

/// Keys whose change only takes effect after a restart.
pub fn needs_restart(key: &str) -> bool {
    key == "port"
        || key == "host"
        || key == "database_url"
        || key.starts_with("engine.")
        || key == "resources.device"
        || key == "resources.cpu_threads"
        || key == "inference.weights"
        || key == "training.model"
        || key == "training.seed"
        || key == "training.data_path"
        || key == "api.max_body_kb"
        || key == "api.max_connections_per_address"
        || key == "api.max_connections"
        || key == "api.header_timeout_secs"
        || key == "api.body_timeout_secs"
        || key == "api.connection_rate_per_address"
        || key.starts_with("tls.")
        || key.starts_with("peer.")
        || key.starts_with("node.")
        || key.starts_with("ledger.")
}

/// `database_url` without its password, for display.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
