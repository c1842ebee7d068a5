//! The REST API against a real node: every endpoint of the route table with and without a
//! token, live answers checked against the node's own OpenAPI document, validation errors,
//! rate limits, config changes, tokens made by the CLI, and a wallet flow funded by the
//! node's own proof-of-work rewards.

use std::process::Command;
use std::time::Duration;

use neuroshard::api::ROUTES;
use neuroshard_tests::{Node, NodeOptions, binary, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

struct Api<'a> {
    node: &'a Node,
    http: reqwest::blocking::Client,
}

struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.node.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().expect("node answers");
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            body,
            retry_after,
        }
    }
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["error"]["code"], code, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

/// Checks `value` against a JSON schema of the OpenAPI document (the subset utoipa emits:
/// $ref, type (also as a list), properties, required, items, oneOf, allOf).
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    check_in(doc, schema, value, at, true)
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => resolve(
            doc,
            &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")],
        ),
        None => schema,
    }
}

/// `strict`: fields the schema does not name are errors (not so inside an allOf part).
fn check_in(
    doc: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    strict: bool,
) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check_in(doc, s, value, at, false)?;
        }
        if let (true, Some(obj)) = (strict, value.as_object()) {
            for k in obj.keys() {
                if !all
                    .iter()
                    .any(|s| resolve(doc, s)["properties"].get(k).is_some())
                {
                    return Err(format!("{at}: field {k} is not in the document"));
                }
            }
        }
        return Ok(());
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let ok = one
            .iter()
            .filter(|s| check_in(doc, s, value, at, strict).is_ok())
            .count();
        return if ok == 1 {
            Ok(())
        } else {
            Err(format!("{at}: {value} matches {ok} of oneOf"))
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() {
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !fits {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(obj) = value.as_object() {
        for req in schema["required"].as_array().into_iter().flatten() {
            let key = req.as_str().unwrap();
            if !obj.contains_key(key) {
                return Err(format!("{at}: required field {key} missing"));
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in obj {
                match props.get(k) {
                    Some(s) => check(doc, s, v, &format!("{at}.{k}"))?,
                    None if strict => {
                        return Err(format!("{at}: field {k} is not in the document"));
                    }
                    None => {}
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Validates a live answer against the document's schema for that path, method and status.
fn conforms(doc: &Value, method: &str, path: &str, a: &Answer) {
    let op = &doc["paths"][path][method.to_ascii_lowercase()];
    assert!(
        op.is_object(),
        "{method} {path} is not in the OpenAPI document"
    );
    let schema = &op["responses"][a.status.to_string()]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path}: status {} is not documented",
        a.status
    );
    if let Err(e) = check(doc, schema, &a.body, path) {
        panic!(
            "{method} {path} answer does not match the OpenAPI document: {e}\n{}",
            a.body
        );
    }
}

fn cli(node: &Node, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("neuroshard"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_endpoint_answers_as_documented() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n"
            .into(),
        ..NodeOptions::default()
    };
    let node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let api = Api {
        node: &node,
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    };
    let cookie = node.api_token().unwrap();
    let token = Some(cookie.trim());

    // The document is OpenAPI 3.1, and it declares every route of the table with the same
    // auth requirement the node enforces.
    let doc = api.call("GET", "/api/v1/openapi.json", None, None).body;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    // (OpenAI's own specification describes the /v1/ endpoints.)
    for r in ROUTES {
        if r.path == "/api/v1/openapi.json"
            || r.path == "/metrics"
            || r.path == "/"
            || r.path.starts_with("/v1/")
        {
            continue;
        }
        let op = &doc["paths"][r.path][r.method.to_ascii_lowercase()];
        assert!(
            op.is_object(),
            "{} {} missing from the document",
            r.method,
            r.path
        );
        assert_eq!(
            op.get("security").is_some(),
            r.auth,
            "{} {} security",
            r.method,
            r.path
        );
    }

    // Without a token: 401 on every protected route (whatever the body), answers elsewhere.
    for r in ROUTES {
        let body = (r.method != "GET").then(|| json!({}));
        let a = api.call(r.method, r.path, None, body.clone());
        if r.auth {
            assert_error(&a, 401, "UNAUTHORIZED");
            let forged = api.call(r.method, r.path, Some("nst_forged"), body);
            assert_error(&forged, 401, "UNAUTHORIZED");
        } else {
            assert!(
                a.status == 200,
                "{} {} -> {} {}",
                r.method,
                r.path,
                a.status,
                a.body
            );
        }
    }

    // Every GET with a token conforms to the document (the model download, a file and not
    // JSON, is checked by model_export.rs).
    for r in ROUTES.iter().filter(|r| r.method == "GET") {
        if r.path == "/api/v1/openapi.json"
            || r.path == "/metrics"
            || r.path == "/"
            || r.path.starts_with("/v1/")
            || r.path == "/api/v1/model/export"
        {
            continue;
        }
        let a = api.call("GET", r.path, token, None);
        assert_eq!(a.status, 200, "{} {}", r.path, a.body);
        conforms(&doc, "GET", r.path, &a);
    }
    let prom = api.call("GET", "/metrics", None, None);
    let text = prom.body.as_str().unwrap().to_string();
    for metric in [
        "neuroshard_training_steps_total",
        "neuroshard_engine_up 1",
        "neuroshard_api_requests_total",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }

    // Errors in the contract's shape.
    assert_error(
        &api.call("GET", "/api/v1/nothing", None, None),
        404,
        "NOT_FOUND",
    );
    assert_error(
        &api.call("DELETE", "/api/v1/status", None, None),
        405,
        "METHOD_NOT_ALLOWED",
    );
    let big = json!({"to": "0x".to_string() + &"a".repeat(100_000), "amount": 1.0});
    assert_error(
        &api.call("POST", "/api/v1/wallet/send", token, Some(big)),
        413,
        "PAYLOAD_TOO_LARGE",
    );
    let r = api
        .http
        .post(node.url("/api/v1/wallet/send"))
        .bearer_auth(cookie.trim())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "INVALID_REQUEST");

    let status = api.call("GET", "/api/v1/status", None, None).body;
    let own = status["wallet_address"].as_str().unwrap().to_string();
    let other = "0x52908400098527886E0F7030069857D2E4169EE7";
    let send = |body: Value| api.call("POST", "/api/v1/wallet/send", token, Some(body));
    for (body, code) in [
        (json!({"to": other, "amount": 0.0}), "INVALID_AMOUNT"),
        (json!({"to": other, "amount": -5.0}), "INVALID_AMOUNT"),
        (
            json!({"to": other, "amount": 0.0000000001}),
            "INVALID_AMOUNT",
        ),
        (json!({"to": other, "amount": "ten"}), "INVALID_REQUEST"),
        (json!({"to": "0x1234", "amount": 1.0}), "INVALID_ADDRESS"),
        (json!({"to": own, "amount": 1.0}), "SELF_TRANSFER"),
        (
            json!({"to": other, "amount": 1.0, "extra": 1}),
            "INVALID_REQUEST",
        ),
        (json!({"amount": 1.0}), "INVALID_REQUEST"),
    ] {
        let a = send(body.clone());
        assert_error(&a, 400, code);
    }
    let broke = send(json!({"to": other, "amount": 1_000_000.0}));
    assert_error(&broke, 402, "INSUFFICIENT_BALANCE");
    assert!(broke.body["error"]["details"]["required"].as_f64().unwrap() > 1_000_000.0);
    assert!(broke.body["error"]["details"]["available"].is_number());
    conforms(&doc, "POST", "/api/v1/wallet/send", &broke);
    let bad_page = api.call("GET", "/api/v1/wallet/transactions?limit=0", token, None);
    assert_error(&bad_page, 400, "INVALID_REQUEST");
    let bad_page = api.call("GET", "/api/v1/wallet/transactions?limit=abc", token, None);
    assert_error(&bad_page, 400, "INVALID_REQUEST");

    // Config: a valid patch is applied and saved; an invalid one changes nothing.
    let ok = api.call(
        "PATCH",
        "/api/v1/config",
        token,
        Some(json!({"training": {"batch_size": 2}})),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["updated"], json!(["training.batch_size"]));
    assert_eq!(ok.body["restart_required"], false);
    conforms(&doc, "PATCH", "/api/v1/config", &ok);
    let file = std::fs::read_to_string(node.data_dir().join("neuroshard.toml")).unwrap();
    assert!(file.contains("batch_size = 2"), "{file}");
    let restart = api.call(
        "PATCH",
        "/api/v1/config",
        token,
        Some(json!({"port": 18123})),
    );
    assert_eq!(restart.body["restart_required"], true, "{}", restart.body);
    assert_eq!(
        api.call("GET", "/api/v1/config", token, None).body["port"],
        node.port
    );
    for bad in [
        json!({"training": {"batch_size": 0}}),
        json!({"training": {"batch_size": "16"}}),
        json!({"training": {"nope": 1}}),
        json!({"node_id": "x"}),
        json!([1, 2]),
    ] {
        let a = api.call("PATCH", "/api/v1/config", token, Some(bad.clone()));
        assert_error(&a, 400, "INVALID_REQUEST");
    }
    let cfg = api.call("GET", "/api/v1/config", token, None).body;
    assert_eq!(cfg["training"]["batch_size"], 2);

    // Tokens made by the CLI: bound to a new wallet, revocable while the node runs.
    let (ok, out, err) = cli(
        &node,
        &["token", "create", "--name", "alice", "--new-wallet"],
    );
    assert!(ok, "{err}");
    let alice = out.lines().nth(1).unwrap().trim().to_string();
    assert!(alice.starts_with("nst_"));
    let (_, list, _) = cli(&node, &["token", "list", "--json"]);
    assert!(!list.contains(&alice), "token list shows a secret");
    let alice_balance = api.call("GET", "/api/v1/wallet/balance", Some(&alice), None);
    assert_eq!(alice_balance.status, 200);
    let alice_addr = alice_balance.body["address"].as_str().unwrap().to_string();
    assert_ne!(alice_addr, own);
    // Nothing staked: `staking` is still the contract's object, zero with null dates.
    conforms(&doc, "GET", "/api/v1/wallet/balance", &alice_balance);
    assert_eq!(
        alice_balance.body["staking"],
        json!({"amount": 0.0, "duration_days": 0, "start_date": null,
               "unlock_date": null, "multiplier": 1.0}),
        "{}",
        alice_balance.body
    );
    // Messages give amounts in NEURO, never base units.
    let unstake = api.call(
        "POST",
        "/api/v1/wallet/unstake",
        Some(&alice),
        Some(json!({"amount": 0.001})),
    );
    assert_error(&unstake, 402, "INSUFFICIENT_STAKE");
    assert_eq!(
        unstake.body["error"]["message"],
        "not enough staked NEURO: requested 0.001 NEURO, staked 0 NEURO"
    );

    // Funds come from the node's proofs of work (one per 60 s epoch).
    let funded = wait_for(
        "a proof-of-work reward",
        Duration::from_secs(150),
        Duration::from_millis(500),
        || {
            let b = api.call("GET", "/api/v1/wallet/balance", token, None).body;
            b["balances"]["available"].as_f64().filter(|a| *a > 0.0)
        },
    )
    .unwrap();
    let amount = (funded / 4.0 * 1e9).floor() / 1e9;
    let sent = send(json!({"to": alice_addr, "amount": amount, "memo": "for alice"}));
    assert_eq!(sent.status, 200, "{}", sent.body);
    conforms(&doc, "POST", "/api/v1/wallet/send", &sent);
    assert_eq!(sent.body["status"], "confirmed");
    // Both wallets are this node's: Alice's is claimed at once (pending until then).
    let b = api
        .call("GET", "/api/v1/wallet/balance", Some(&alice), None)
        .body;
    let held =
        b["balances"]["available"].as_f64().unwrap() + b["balances"]["pending"].as_f64().unwrap();
    assert!((held - amount).abs() < 1e-9, "{b}");
    wait_for(
        "Alice's node to claim her transfer",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let a = api.call("GET", "/api/v1/wallet/transactions", Some(&alice), None);
            let line = &a.body["transactions"][0];
            (line["type"] == "receive" && line["status"] == "confirmed").then_some(())
        },
    )
    .unwrap();
    let b = api.call("GET", "/api/v1/wallet/balance", Some(&alice), None);
    conforms(&doc, "GET", "/api/v1/wallet/balance", &b);
    assert!(
        (b.body["balances"]["available"].as_f64().unwrap() - amount).abs() < 1e-9,
        "{}",
        b.body
    );
    let history = api.call(
        "GET",
        "/api/v1/wallet/transactions?limit=1&offset=0",
        token,
        None,
    );
    conforms(&doc, "GET", "/api/v1/wallet/transactions", &history);
    assert_eq!(history.body["transactions"][0]["type"], "send");
    assert!(
        history.body["total"].as_u64().unwrap() >= 2,
        "{}",
        history.body
    );
    let proofs = api.call("GET", "/api/v1/proofs?limit=5", token, None);
    conforms(&doc, "GET", "/api/v1/proofs", &proofs);
    assert!(proofs.body["stats"]["total_verified"].as_u64().unwrap() >= 1);
    let metrics = api.call("GET", "/api/v1/metrics", None, None).body;
    assert!(metrics["rewards"]["earned_total"].as_f64().unwrap() > 0.0);

    let stake_amount = (funded / 4.0 * 1e9).floor() / 1e9;
    let staked = api.call(
        "POST",
        "/api/v1/wallet/stake",
        token,
        Some(json!({"amount": stake_amount, "duration_days": 1})),
    );
    assert_eq!(staked.status, 200, "{}", staked.body);
    conforms(&doc, "POST", "/api/v1/wallet/stake", &staked);
    let locked = api.call(
        "POST",
        "/api/v1/wallet/unstake",
        token,
        Some(json!({"amount": stake_amount})),
    );
    assert_error(&locked, 409, "STAKE_LOCKED");
    let bad_days = api.call(
        "POST",
        "/api/v1/wallet/stake",
        token,
        Some(json!({"amount": 0.000000001, "duration_days": 0})),
    );
    assert_error(&bad_days, 400, "INVALID_DURATION");

    // The CLI mirrors the API.
    let port = node.port.to_string();
    let (ok, out, err) = cli(&node, &["wallet", "--port", &port, "--json", "balance"]);
    assert!(ok, "{err}");
    let b: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["address"], own);
    let (ok, out, _) = cli(
        &node,
        &["wallet", "--port", &port, "history", "--limit", "3"],
    );
    assert!(ok && out.contains("send"), "{out}");
    let (ok, out, _) = cli(&node, &["status", "--port", &port]);
    assert!(ok && out.contains(&own), "{out}");
    let (ok, out, _) = cli(&node, &["peers", "--port", &port, "--json"]);
    assert!(
        ok && serde_json::from_str::<Value>(&out).unwrap()["total"] == 0,
        "{out}"
    );

    // Revoked tokens stop working at once.
    let (ok, _, err) = cli(&node, &["token", "revoke", "alice"]);
    assert!(ok, "{err}");
    assert_error(
        &api.call("GET", "/api/v1/wallet/balance", Some(&alice), None),
        401,
        "UNAUTHORIZED",
    );

    // Rate limits: a low per-address budget set live; anonymous requests get 429 with
    // Retry-After, while the token's own budget is untouched.
    let set = api.call(
        "PATCH",
        "/api/v1/config",
        token,
        Some(json!({"api": {"rate_limit_per_ip": 3}})),
    );
    assert_eq!(set.body["restart_required"], false, "{}", set.body);
    let answers: Vec<Answer> = (0..6)
        .map(|_| api.call("GET", "/api/v1/status", None, None))
        .collect();
    let limited = answers
        .iter()
        .find(|a| a.status == 429)
        .expect("a 429 after the budget");
    assert_error(limited, 429, "RATE_LIMITED");
    let retry = limited.body["error"]["details"]["retry_after"]
        .as_u64()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(
        limited.retry_after.as_deref(),
        Some(retry.to_string().as_str())
    );
    assert_eq!(api.call("GET", "/api/v1/status", token, None).status, 200);
    let reset = api.call(
        "PATCH",
        "/api/v1/config",
        token,
        Some(json!({"api": {"rate_limit_per_ip": 300}})),
    );
    assert_eq!(reset.status, 200);
    assert_eq!(api.call("GET", "/api/v1/status", None, None).status, 200);
    assert!(!node.logs().contains("panicked"));
}
