//! The facade's OpenAPI document judged by two tools no one here wrote (from PyPI, pinned in
//! tests/runner/requirements.txt, in the venv `make venv` builds): `openapi-spec-validator` must
//! accept it, and a bounded `schemathesis` run against the live server must find nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What schemathesis checks: no 5xx, only documented status codes and content types, answers
/// that match their schemas, and requests that break the schema refused.
pub const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                          response_schema_conformance,negative_data_rejection";

fn venv_bin(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin").join(name);
    assert!(bin.exists(), "{} is missing: run `make venv` first", bin.display());
    bin
}

fn report(what: &str, out: &Output) -> String {
    format!(
        "{what} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fetches `/openapi.json` (with the token when there is one) and runs openapi-spec-validator on it.
pub async fn validate_document(url: &str, token: Option<&str>) -> serde_json::Value {
    let mut req = reqwest::Client::new().get(format!("{url}/openapi.json"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET /openapi.json");
    assert_eq!(resp.status().as_u16(), 200, "GET /openapi.json");
    let text = resp.text().await.expect("the document");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, &text).expect("write the document");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(venv_bin("openapi-spec-validator")).arg(&path).output()
    })
    .await
    .expect("join")
    .expect("run openapi-spec-validator");
    assert!(out.status.success(), "{}", report("openapi-spec-validator", &out));
    serde_json::from_str(&text).expect("the document is JSON")
}

/// A bounded schemathesis run (a fixed seed, few examples per operation, one worker) with the
/// bearer token; panics with its report when it finds anything.
pub async fn schemathesis(url: &str, token: &str, max_examples: u32) {
    let work = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(venv_bin("schemathesis"));
    cmd.arg("run")
        .arg(format!("{url}/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", &max_examples.to_string()])
        .args(["--seed", "1", "--workers", "1", "--generation-database", "none"])
        .args(["--request-timeout", "30", "--no-color"])
        // Its caches and reports stay out of the repository.
        .current_dir(work.path())
        .env("HOME", work.path())
        .env("SCHEMATHESIS_TELEMETRY", "false");
    let out =
        tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run schemathesis");
    assert!(out.status.success(), "{}", report("schemathesis", &out));
}
