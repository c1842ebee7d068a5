//! Hostile input against a real node: a property-based fuzzer driven by the node's own OpenAPI
//! document sends thousands of requests (valid, mutated and garbage bodies and queries, with
//! and without a token). No answer may be a 5xx, every error must be the contract's body, and
//! the node must stay healthy. Also: secrets never reach the logs, private files are private.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions};
use serde_json::{Map, Value, json};

/// Requests sent (the issue asks for thousands).
const CASES: usize = 3000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
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

fn any_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.next() as i64),
        3 => json!(
            [-1e308, -1.0, 0.0, 1e-12, 0.5, 1e21, 1.7976931348623157e308][rng.below(7) as usize]
        ),
        4 => json!(
            [
                "",
                "0x",
                "💥",
                &"a".repeat(5000),
                "\u{0}",
                "../../etc/passwd",
                "1e309"
            ][rng.below(7) as usize]
        ),
        5 => json!(rng.below(1000)),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for i in 0..rng.below(4) {
                m.insert(format!("k{i}"), any_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A value for `schema`: usually of the right shape, sometimes deliberately wrong.
fn generate(doc: &Value, schema: &Value, rng: &mut Rng, depth: u32) -> Value {
    let schema = resolve(doc, schema);
    if rng.chance(8) || depth > 4 {
        return any_value(rng, depth);
    }
    if let Some(one) = schema["oneOf"].as_array().or(schema["allOf"].as_array()) {
        let pick = &one[rng.below(one.len() as u64) as usize];
        return generate(doc, pick, rng, depth + 1);
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts[rng.below(ts.len() as u64) as usize]
            .as_str()
            .unwrap_or("null")
            .to_string(),
        _ => "object".into(),
    };
    match ty.as_str() {
        "object" => {
            let mut m = Map::new();
            if let Some(props) = schema["properties"].as_object() {
                let required: Vec<&str> = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                for (k, s) in props {
                    if required.contains(&k.as_str()) && !rng.chance(5) || rng.chance(50) {
                        m.insert(k.clone(), generate(doc, s, rng, depth + 1));
                    }
                }
            }
            if rng.chance(5) {
                m.insert("unexpected".into(), any_value(rng, depth + 1));
            }
            Value::Object(m)
        }
        "string" => json!(
            [
                "",
                "0x52908400098527886E0F7030069857D2E4169EE7",
                "The river",
                &"x".repeat(rng.below(300) as usize),
                "\u{202e}ü"
            ][rng.below(5) as usize]
        ),
        "integer" => json!([0i64, 1, 7, 30, 366, -1, i64::MAX][rng.below(7) as usize]),
        "number" => json!(
            [0.0, 0.000000001, 0.5, 1.0, 2.5, -3.0, 1e12, 0.1234567891][rng.below(8) as usize]
        ),
        "boolean" => json!(rng.chance(50)),
        "array" => Value::Array(
            (0..rng.below(4))
                .map(|_| generate(doc, &schema["items"], rng, depth + 1))
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn query(doc: &Value, op: &Value, rng: &mut Rng) -> String {
    let mut parts = Vec::new();
    for p in op["parameters"].as_array().into_iter().flatten() {
        if rng.chance(60) {
            let v = match generate(doc, &p["schema"], rng, 3) {
                Value::String(s) => s,
                other => other.to_string(),
            };
            let v: String = v.chars().take(50).collect();
            parts.push(format!("{}={}", p["name"].as_str().unwrap(), urlencode(&v)));
        }
    }
    if rng.chance(5) {
        parts.push("bogus=%FF%FE".into());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn openapi_driven_fuzzing_never_gets_a_5xx_or_a_crash() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let opts = NodeOptions {
        config: "[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 2\nseq_len = 32\n\
                 [api]\nrate_limit_per_token = 1000000\nrate_limit_per_ip = 1000000\n"
            .into(),
        ..NodeOptions::default()
    };
    let node = Node::start(opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    // Inference answers 503 until the model is loaded; fuzz the loaded node.
    node.wait_model_loaded(Duration::from_secs(60)).unwrap();
    let cookie = node.api_token().unwrap();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let doc: Value = http
        .get(node.url("/api/v1/openapi.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops.push((path.clone(), method.to_uppercase(), op.clone()));
        }
    }
    assert!(ops.len() >= 15, "{} operations", ops.len());

    let mut rng = Rng(0x5eed);
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..CASES {
        let (path, method, op) = &ops[case % ops.len()];
        // Keep PATCH /config from breaking the node for the rest of the run: never disable
        // training's engine, shrink limits or move ports (those are validated, saved, and would
        // only need a restart; the fuzzer still sends everything else).
        let mut body = op.get("requestBody").map(|rb| {
            let schema = &rb["content"]["application/json"]["schema"];
            if schema.is_object() && !schema["type"].is_null() && schema["type"] != "object"
                || schema["properties"].is_object()
                || schema["$ref"].is_string()
            {
                generate(&doc, schema, &mut rng, 0)
            } else {
                any_value(&mut rng, 0)
            }
        });
        if path == "/api/v1/config" && method == "PATCH" {
            body = Some(
                json!({"training": {"batch_size": 1 + rng.below(4), "nope": rng.chance(30).then_some(1)}}),
            );
        }
        if path == "/api/v1/inference"
            && let Some(Value::Object(m)) = body.as_mut()
        {
            m.insert("max_tokens".into(), json!(rng.below(8)));
        }
        let url = node.url(&format!("{path}{}", query(&doc, op, &mut rng)));
        let mut req = http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            &url,
        );
        if !rng.chance(20) {
            req = req.bearer_auth(cookie.trim());
        }
        req = match (rng.below(10), &body) {
            (0, _) => req
                .header("content-type", "application/json")
                .body("{\"a\": [1, 2,"),
            (1, _) => req.header("content-type", "text/plain").body("hello"),
            (_, Some(b)) => req.json(b),
            (_, None) => req,
        };
        let r = req
            .send()
            .unwrap_or_else(|e| panic!("case {case} {method} {url}: no answer: {e}"));
        let status = r.status().as_u16();
        *by_status.entry(status).or_default() += 1;
        let text = r.text().unwrap_or_default();
        assert!(
            status < 500,
            "case {case}: {method} {url} {body:?} -> {status} {text}"
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "case {case}: {method} {url} -> {status} body {text}"
            );
        }
    }
    println!("{CASES} cases, answers by status: {by_status:?}");
    assert!(
        by_status.keys().any(|s| *s == 200)
            && by_status.keys().any(|s| *s == 400)
            && by_status.keys().any(|s| *s == 401)
    );
    node.wait_healthy(Duration::from_secs(10)).unwrap();

    // Secrets never reach the logs; private files are private.
    let logs = node.logs();
    assert!(!logs.contains("panicked"), "a panic in the logs");
    assert!(
        !logs.contains(cookie.trim()),
        "the cookie token is in the logs"
    );
    let wallet: Value = serde_json::from_str(
        &std::fs::read_to_string(node.data_dir().join("wallet.json")).unwrap(),
    )
    .unwrap();
    let secret = wallet["secret"].as_str().expect("plain keystore");
    assert!(!logs.contains(secret), "the wallet key is in the logs");
    for f in [
        "wallet.json",
        "api.cookie",
        "ledger.db",
        "ledger.db-wal",
        "node_id",
    ] {
        let mode = std::fs::metadata(node.data_dir().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
    }
}
