//! Reading rendered Kubernetes manifests (`kubectl kustomize`, `helm template`) in tests: every
//! object of a multi-document stream by `Kind/name`, and fields by path.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeMap;

/// Every object of a multi-document YAML stream, by `Kind/name`; panics on invalid YAML or an
/// object rendered twice (both are test failures).
pub fn objects(yaml: &str) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).expect("valid YAML");
        if value.is_null() {
            continue;
        }
        let key = format!("{}/{}", str_at(&value, &["kind"]), str_at(&value, &["metadata", "name"]));
        assert!(all.insert(key.clone(), value).is_none(), "{key} rendered twice");
    }
    all
}

/// The value at `path` (map keys), or null.
pub fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(value, |v, k| v.get(*k).unwrap_or(&Value::Null))
}

/// The string at `path`, or "".
pub fn str_at(value: &Value, path: &[&str]) -> String {
    at(value, path).as_str().unwrap_or_default().to_string()
}

/// The first container of a workload (Deployment, DaemonSet, Job).
pub fn container(workload: &Value) -> &Value {
    &at(workload, &["spec", "template", "spec", "containers"])[0]
}
