//! The local API: tokens for integrations, accounts for operators, health and metrics, over the
//! Unix socket (the peer's uid decides) and TCP (a bearer token decides).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokend_mock::{Endpoint, MockConfig};

use crate::helpers::{Env, eventually, write_private};

fn socket_client(path: &Path) -> reqwest::Client {
    tokend::provider::install_crypto_provider();
    reqwest::Client::builder()
        .unix_socket(path)
        .build()
        .expect("client")
}

/// One request: status, headers, JSON body (`Null` if not JSON).
async fn call(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut r = client.request(method, format!("{base}{path}"));
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("send");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = resp.text().await.expect("body");
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

const SOCKET: &str = "http://tokend";

fn socket_of(env: &Env) -> PathBuf {
    env.dir.path().join("api.sock")
}

async fn started(env: &Env) -> crate::helpers::Running {
    let daemon = env.start();
    eventually(Duration::from_secs(5), "the API answers", || {
        std::os::unix::net::UnixStream::connect(socket_of(env)).is_ok()
            && env.health()["status"] != "starting"
            && !env.health().is_null()
    })
    .await;
    daemon
}

#[tokio::test(start_paused = true)]
async fn fifty_callers_asking_for_a_short_token_cause_exactly_one_refresh() {
    let env = Env::new(MockConfig::default(), "").await;
    // Ten seconds left, not yet due for the engine (lead 3 s + jitter 1 s).
    env.add_user("u", Duration::from_secs(3590));
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    let asks = (0..50).map(|_| {
        call(
            &client,
            SOCKET,
            Method::GET,
            "/v1/accounts/u/token?min_ttl=300",
            None,
            None,
        )
    });
    let answers = futures_util::future::join_all(asks).await;
    daemon.stop().await;
    let (newest, _) = env.mock.newest("u").expect("issued");
    for (status, _, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(
            body["access_token"],
            newest.as_str(),
            "an old or other token served"
        );
        assert_eq!(body["token_type"], "Bearer");
        let expires =
            chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().expect("expiry"))
                .expect("RFC 3339");
        assert!(expires.timestamp() - env.now() >= 300, "{body}");
    }
    assert_eq!(
        env.mock.account("u").grants,
        1,
        "exactly one refresh for fifty callers"
    );
    assert_eq!(env.mock.totals().concurrent_same_account, 0);
}

/// Tokens are served from memory once fetched; a relink by another program's UPDATE (the
/// README's way) or its DELETE is served within the engine's one-second poll, a refresh at once.
#[tokio::test(start_paused = true)]
async fn another_programs_relink_or_delete_is_served_within_a_second() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::from_secs(600));
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    let fetch = || {
        call(
            &client,
            SOCKET,
            Method::GET,
            "/v1/accounts/u/token?min_ttl=60",
            None,
            None,
        )
    };
    let (status, _, first) = fetch().await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, _, again) = fetch().await;
    assert_eq!(again["access_token"], first["access_token"]);

    // The user authorised again: a new grant with ten minutes left on its access token.
    let grant = env.relink("u", Duration::from_secs(3000));
    let relinked = tokio::time::Instant::now();
    loop {
        let (status, _, body) = fetch().await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["access_token"] == grant.access_token.as_str() {
            break;
        }
        assert_eq!(body["access_token"], first["access_token"], "neither token");
        assert!(
            relinked.elapsed() <= tokend::engine::CHANGE_POLL + Duration::from_millis(100),
            "the old grant's token still served {:?} after the relink",
            relinked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A refresh forced by min_ttl: the answer and every fetch after it carry the new token.
    let (status, _, forced) = call(
        &client,
        SOCKET,
        Method::GET,
        "/v1/accounts/u/token?min_ttl=1200",
        None,
        None,
    )
    .await;
    let (newest, _) = env.mock.newest("u").expect("issued");
    assert_eq!(status, StatusCode::OK, "{forced}");
    assert_eq!(forced["access_token"], newest.as_str());
    let (_, _, after) = fetch().await;
    assert_eq!(
        after["access_token"],
        newest.as_str(),
        "the token before the refresh"
    );

    // Another program's DELETE: unknown within the same second.
    env.conn()
        .execute("DELETE FROM accounts WHERE id = 'u'", [])
        .expect("delete");
    let deleted = tokio::time::Instant::now();
    loop {
        let (status, _, body) = fetch().await;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            deleted.elapsed() <= tokend::engine::CHANGE_POLL + Duration::from_millis(100),
            "a deleted account's token still served {:?} after the DELETE",
            deleted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.stop().await;
}

/// A token in memory with too little left is read again before tokend refreshes: another
/// tokend on the same database may have stored a newer one since the last poll.
#[tokio::test(start_paused = true)]
async fn a_cached_token_too_short_is_read_again_before_refreshing() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::from_secs(3000));
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    let client = &client;
    let fetch = |min_ttl: u64| async move {
        let path = format!("/v1/accounts/u/token?min_ttl={min_ttl}");
        call(client, SOCKET, Method::GET, &path, None, None).await
    };
    let (status, _, first) = fetch(60).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    // Stored behind this tokend's back (as a second one would after refreshing): an hour left.
    let newer = env.relink("u", Duration::ZERO);
    let (status, _, body) = fetch(1200).await;
    daemon.stop().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["access_token"],
        newer.access_token.as_str(),
        "not the token in the database"
    );
}

#[tokio::test(start_paused = true)]
async fn the_token_route_says_404_409_or_503_when_it_cannot_serve() {
    let env = Env::new(
        MockConfig::default(),
        "retry_initial = \"10s\"\nretry_max = \"20s\"",
    )
    .await;
    env.add_user("short", Duration::from_secs(3590));
    env.add_user("dead", Duration::from_secs(60));
    env.add_company("c");
    env.conn()
        .execute("UPDATE accounts SET state = 'needs_reauth', state_reason = 'the user revoked it', revision = revision + 1 WHERE id = 'dead'", [])
        .expect("update");
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    let get = |path: &'static str| call(&client, SOCKET, Method::GET, path, None, None);

    let (status, _, body) = get("/v1/accounts/nobody/token").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, _, body) = get("/v1/accounts/dead/token").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["state"], "needs_reauth");
    assert_eq!(body["reason"], "the user revoked it");

    let (status, _, body) = get("/v1/accounts/c/token").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["expires_at"],
        Value::Null,
        "a company token does not expire"
    );

    env.mock.set_outage(Endpoint::Token, true);
    let (status, headers, body) = get("/v1/accounts/short/token?min_ttl=300").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("header")
        .parse()
        .expect("seconds");
    assert!((1..=3600).contains(&retry), "Retry-After {retry}");
    // The short token itself is still served when it is enough.
    let (status, _, _) = get("/v1/accounts/short/token?min_ttl=5").await;
    assert_eq!(status, StatusCode::OK);

    let (status, _, body) = get("/v1/accounts/short/token?min_ttl=soon").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "min_ttl");
    let (status, _, body) = get("/v1/accounts/short/token?ttl=5").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "ttl");
    daemon.stop().await;
}

/// Bearer tokens for the TCP listener: one per scope.
const READER: &str = "reader-0123456789abcdef";
const FETCHER: &str = "fetcher-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef01";

async fn tcp_env() -> (Env, crate::helpers::Running, String) {
    let env = Env::new(MockConfig::default(), "").await;
    let tokens = env.dir.path().join("api-tokens");
    write_private(
        &tokens,
        &format!("monitoring read {READER}\nbilling token {FETCHER}\nops admin,read {ADMIN}\n"),
    );
    let mut text = std::fs::read_to_string(&env.config_path).expect("config");
    text = text.replace(
        "\n[api]\n",
        &format!(
            "\n[api]\nlisten = \"127.0.0.1:0\"\ntokens_file = \"{}\"\n",
            tokens.display()
        ),
    );
    std::fs::write(&env.config_path, text).expect("config");
    let daemon = started(&env).await;
    let addr = env.health()["api"]["listen"]
        .as_str()
        .expect("listen address in the health file")
        .to_owned();
    (env, daemon, format!("http://{addr}"))
}

#[tokio::test(start_paused = true)]
async fn tcp_needs_a_bearer_and_the_right_scope() {
    let (env, daemon, base) = tcp_env().await;
    env.add_user("u", Duration::from_secs(60));
    let client = reqwest::Client::new();
    let c = |m: Method, p: &'static str, b: Option<&'static str>, body: Option<Value>| {
        call(&client, &base, m, p, b, body)
    };
    let (status, headers, _) = c(Method::GET, "/v1/accounts", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));
    let (status, _, _) = c(
        Method::GET,
        "/v1/accounts",
        Some("wrong-0123456789abcdef"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _, body) = c(Method::GET, "/v1/accounts", Some(READER), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, _) = c(Method::GET, "/v1/accounts/u/token", Some(READER), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "read cannot fetch tokens");
    let (status, _, body) = c(Method::GET, "/v1/accounts/u/token", Some(FETCHER), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["access_token"].is_string());

    let new = json!({"id": "linked", "token_type": "user", "refresh_token": "r-new", "access_token": "a-new"});
    let (status, _, _) = c(
        Method::POST,
        "/v1/accounts",
        Some(FETCHER),
        Some(new.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "token cannot write accounts");
    let (status, _, body) = c(Method::POST, "/v1/accounts", Some(ADMIN), Some(new.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["id"], "linked");
    assert!(body.get("refresh_token").is_none() && !body.to_string().contains("r-new"));
    let (status, _, body) = c(Method::POST, "/v1/accounts", Some(ADMIN), Some(new)).await;
    assert_eq!(status, StatusCode::CONFLICT, "create-only: {body}");
    let (status, _, body) = c(
        Method::POST,
        "/v1/accounts",
        Some(ADMIN),
        Some(json!({"id": "x", "token_type": "user", "colour": "blue"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("colour")),
        "{body}"
    );
    let (status, _, body) = c(
        Method::POST,
        "/v1/accounts",
        Some(ADMIN),
        Some(json!({"id": "x", "token_type": "user", "access_token": "a"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "refresh_token", "{body}");
    let huge = json!({"id": "big", "token_type": "user", "refresh_token": "r".repeat(70 * 1024)});
    let (status, _, _) = c(Method::POST, "/v1/accounts", Some(ADMIN), Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Health and metrics.
    let (status, _, _) = c(Method::GET, "/healthz", Some(READER), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = c(Method::GET, "/readyz", Some(READER), None).await;
    assert_eq!(status, StatusCode::OK);
    // Accounts by state are counted at most as often as counting allows (a count that took
    // long, as on a loaded machine, is reused for a while): wait until they show.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (status, headers, body) = c(Method::GET, "/metrics", Some(READER), None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers["content-type"]
                .to_str()
                .expect("type")
                .starts_with("application/openmetrics-text")
        );
        let text = body.as_str().expect("text").to_owned();
        if text.contains("tokend_accounts{") || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for family in [
        "tokend_refreshes_total",
        "tokend_accounts{",
        "tokend_min_token_headroom_seconds",
        "tokend_api_requests_total{route=\"/v1/accounts/{id}/token\",code=\"200\"}",
        "tokend_build_info",
        "tokend_profile_paused",
        "tokend_breaker_open",
        "tokend_refreshes_in_flight",
        "tokend_store_commit_duration_seconds",
    ] {
        assert!(text.contains(family), "{family} not in /metrics:\n{text}");
    }
    // Relink, resume, and remove with revocation at the provider.
    let t = env.mock.issue_user("u", Duration::ZERO);
    let (status, _, body) = c(
        Method::PUT,
        "/v1/accounts/u/grant",
        Some(ADMIN),
        Some(json!({"access_token": t.access_token, "refresh_token": t.refresh_token, "expires_at": t.expires_at})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(env.tokens("u").1, t.refresh_token);
    let (status, _, _) = c(Method::POST, "/v1/accounts/u/resume", Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::OK);
    let revoked_before = env.mock.totals().revocations;
    let (status, _, body) = c(
        Method::DELETE,
        "/v1/accounts/u?revoke=true",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(env.mock.totals().revocations, revoked_before + 1);
    assert!(
        !env.mock
            .refresh_token_live(t.refresh_token.as_deref().expect("refresh"))
    );
    let (status, _, _) = c(Method::GET, "/v1/accounts/u", Some(READER), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn listings_page_by_cursor_and_filter() {
    let env = Env::new(MockConfig::default(), "").await;
    for i in 0..5 {
        env.add_user(&format!("u{i}"), Duration::from_secs(60));
    }
    env.add_company("c");
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    let mut seen = Vec::new();
    let mut path = "/v1/accounts?limit=2".to_owned();
    loop {
        let (status, _, body) = call(&client, SOCKET, Method::GET, &path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for a in body["accounts"].as_array().expect("accounts") {
            seen.push(a["id"].as_str().expect("id").to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/accounts?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, ["c", "u0", "u1", "u2", "u3", "u4"]);
    let (_, _, body) = call(
        &client,
        SOCKET,
        Method::GET,
        "/v1/accounts?state=active&limit=10",
        None,
        None,
    )
    .await;
    assert_eq!(body["accounts"].as_array().expect("list").len(), 6);
    let (status, _, body) = call(
        &client,
        SOCKET,
        Method::GET,
        "/v1/accounts?state=sleepy",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "state");
    let (status, _, body) = call(&client, SOCKET, Method::GET, "/v1/accounts/u0", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["account"]["id"], "u0");
    assert!(body["events"].is_array());
    daemon.stop().await;
}

/// The socket as other users meet it: a process of a user outside `socket_group` cannot
/// connect; a member reads and fetches tokens but cannot write. Needs root (setpriv).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_refuses_non_members_and_gives_members_read_and_token() {
    let env = Env::new(MockConfig::default(), "log_level = \"info\"").await;
    env.add_user("u", Duration::from_secs(60));
    // A directory other users can traverse, for the socket and a config they can read.
    let public = tempfile::Builder::new()
        .prefix("tokend-api-")
        .tempdir_in("/tmp")
        .expect("dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = public.path().join("api.sock");
    const GROUP: u32 = 47_113;
    let text = std::fs::read_to_string(&env.config_path)
        .expect("config")
        .replace(
            &format!("socket = \"{}\"", socket_of(&env).display()),
            &format!(
                "socket = \"{}\"\nsocket_group = \"{GROUP}\"",
                socket.display()
            ),
        );
    let config = public.path().join("tokend.toml");
    std::fs::write(&config, text).expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut bin = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["--config", config.to_str().expect("path"), "run"])
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::fs::File::create(env.dir.path().join("api-run.log")).expect("log"))
        .spawn()
        .expect("spawn");
    eventually(Duration::from_secs(10), "socket up", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    let as_user = |groups: Option<u32>, args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534"]);
        match groups {
            Some(g) => cmd.arg(format!("--groups={g}")),
            None => cmd.arg("--clear-groups"),
        };
        cmd.args(args)
            .output()
            .expect("setpriv (util-linux) runs; this test needs root")
    };
    let tokend = env!("CARGO_BIN_EXE_tokend");
    let cfg = config.to_str().expect("path");
    // Outside the group: the kernel refuses the connection (and the database is not theirs).
    let out = as_user(None, &[tokend, "--config", cfg, "token", "u"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused this user"), "{err}");
    assert!(out.stdout.is_empty());
    // A member: a token through the CLI (which asks the socket), but no writes.
    let out = as_user(
        Some(GROUP),
        &[tokend, "--config", cfg, "token", "u", "--min-ttl", "1s"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        env.mock.newest("u").expect("issued").0
    );
    let out = as_user(
        Some(GROUP),
        &[tokend, "--config", cfg, "accounts", "resume", "u"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin"),
        "{out:?}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &bin.id().to_string()])
        .status();
    assert!(bin.wait().expect("wait").success());
    let log = std::fs::read_to_string(env.dir.path().join("api-run.log")).expect("log");
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("token served")).collect();
    assert_eq!(audit.len(), 1, "one audit line per token fetch:\n{log}");
    assert!(
        audit[0].contains("uid 65534") && audit[0].contains("account_id=u"),
        "{}",
        audit[0]
    );
    let (access, refresh, _) = env.tokens("u");
    for secret in [access, refresh].into_iter().flatten() {
        assert!(!log.contains(&secret), "a token reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_asks_the_daemon_and_falls_back_to_the_database() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("soon", Duration::from_secs(3590));
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "socket up", || {
        std::os::unix::net::UnixStream::connect(socket_of(&env)).is_ok()
    })
    .await;
    // Ten seconds left; asking for five minutes makes the daemon refresh it first.
    let out = env.tokend(&["token", "soon", "--min-ttl", "5m", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        body["access_token"],
        env.mock.newest("soon").expect("issued").0.as_str()
    );
    assert_eq!(env.mock.account("soon").grants, 1);
    let live = env.tokend(&["status", "--liveness"]);
    assert_eq!(
        live.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&live.stdout)
    );
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
    // Stopped: the database answers, and will not hand out more than it has.
    let out = env.tokend(&["token", "soon"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.tokend(&["token", "soon", "--min-ttl", "2h"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let live = env.tokend(&["status", "--liveness"]);
    assert_eq!(live.status.code(), Some(1), "a stopped daemon is not alive");
    // A config that does not parse still leads to the database it names.
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    std::fs::write(
        &env.config_path,
        text.replace("refresh_lead = \"3s\"", "refresh_lead = \"soon\""),
    )
    .expect("write");
    let out = env.tokend(&["token", "soon"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("using database"));
}

/// The document served is the one in the tree, and it describes exactly the routes the router
/// has, with their methods (schemathesis, in `.ci/api-fuzz`, checks the rest against a running
/// daemon).
#[tokio::test(start_paused = true)]
async fn the_openapi_document_is_served_and_describes_every_route() {
    let env = Env::new(MockConfig::default(), "").await;
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    let resp = client
        .get(format!("{SOCKET}/v1/openapi.yaml"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/yaml");
    let doc = resp.text().await.expect("body");
    daemon.stop().await;
    assert!(doc.starts_with("openapi: 3.1."), "not OpenAPI 3.1");
    assert_eq!(doc, include_str!("../../src/api/openapi.yaml"));

    let code = include_str!("../../src/api/routes.rs");
    let router = code
        .split_once("fn router()")
        .and_then(|(_, rest)| rest.split_once("\n}\n"))
        .expect("routes.rs has fn router()")
        .0;
    let mut routed = std::collections::BTreeSet::new();
    for call in router.split(".route(\"").skip(1) {
        let (path, handlers) = call.split_once('"').expect("a path literal");
        for method in ["get", "post", "put", "delete", "patch"] {
            let called = handlers
                .match_indices(&format!("{method}("))
                .any(|(i, _)| i == 0 || !handlers.as_bytes()[i - 1].is_ascii_alphanumeric());
            if called {
                routed.insert(format!("{method} {path}"));
            }
        }
    }
    assert!(routed.len() >= 13, "found too few routes: {routed:?}");
    let mut described = std::collections::BTreeSet::new();
    let paths = doc.split_once("\npaths:\n").expect("a paths section").1;
    let mut path = None;
    for line in paths.lines() {
        if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('#') {
            break; // the next top-level key
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let (Some(p), Some(m)) = (
            &path,
            line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
        ) && ["get", "put", "post", "delete", "patch", "head", "options"].contains(&m)
        {
            described.insert(format!("{m} {p}"));
        }
    }
    assert_eq!(routed, described, "routes.rs and openapi.yaml disagree");
}

/// Found fuzzing the API: an id starting with NUL passed the row validator but not the table's
/// CHECK (SQLite's length() stops at a NUL), and linking it answered 500.
#[tokio::test(start_paused = true)]
async fn linking_an_id_with_a_nul_is_a_422_naming_the_id() {
    let env = Env::new(MockConfig::default(), "").await;
    let daemon = started(&env).await;
    let client = socket_client(&socket_of(&env));
    for id in ["\u{0}", "\u{0}a", "a\u{0}b"] {
        let (status, _, body) = call(
            &client,
            SOCKET,
            Method::POST,
            "/v1/accounts",
            None,
            Some(json!({"id": id, "token_type": "user", "refresh_token": "r-1"})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{id:?}: {body}");
        assert_eq!(body["field"], "id", "{body}");
    }
    daemon.stop().await;
    let rows: i64 = env
        .conn()
        .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 0);
}
