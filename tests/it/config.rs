//! Configuration loading and validation.

use std::path::Path;

use tokend::config::Config;

const GOOD_PROFILE: &str = r#"
[[profile]]
name = "factorial"
client_id = "abc"
client_secret = "inline"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(Path::new("/etc/tokend/tokend.toml"), text).map_err(|e| e.to_string())
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse(GOOD_PROFILE).expect("valid");
    assert_eq!(c.daemon.refresh_lead.get().as_secs(), 600);
    assert_eq!(c.profiles[0].base_url, "https://api.factorialhr.com");
    assert_eq!(c.daemon.revocation_schedule, "0 */15 * * * *");
    assert_eq!(c.warnings.len(), 1, "inline secret warns");
    assert!(
        !format!("{:?}", c.profiles[0]).contains("inline"),
        "Debug shows the secret"
    );
    let sandbox = parse(&GOOD_PROFILE.replace("client_id", "environment = \"sandbox\"\nclient_id"))
        .expect("valid");
    assert_eq!(
        sandbox.profiles[0].base_url,
        "https://api.demo.factorialhr.dev"
    );
}

#[test]
fn new_keys_have_their_documented_defaults_and_can_be_set() {
    let c = parse(GOOD_PROFILE).expect("valid");
    assert_eq!(c.daemon.min_refresh_interval.get().as_secs(), 60);
    assert_eq!(c.daemon.max_token_requests_per_hour, 30);
    let p = &c.profiles[0];
    assert_eq!(p.default_token_lifetime.get().as_secs(), 3600);
    assert!(p.revoke_superseded);
    assert!(!p.allow_insecure_http);

    let c = parse(&format!(
        "[daemon]\nmin_refresh_interval = \"5m\"\nmax_token_requests_per_hour = 4\n{GOOD_PROFILE}\
         default_token_lifetime = \"2h\"\nrevoke_superseded = false\nallow_insecure_http = true\n"
    ))
    .expect("valid");
    assert_eq!(c.daemon.min_refresh_interval.get().as_secs(), 300);
    assert_eq!(c.daemon.max_token_requests_per_hour, 4);
    let p = &c.profiles[0];
    assert_eq!(p.default_token_lifetime.get().as_secs(), 7200);
    assert!(!p.revoke_superseded);
    assert!(p.allow_insecure_http);
    let debug = format!("{p:?}");
    assert!(debug.contains("revoke_superseded: false"), "{debug}");
    assert!(!debug.contains("inline"), "Debug shows the secret: {debug}");
}

#[test]
fn invalid_configs_name_the_key_and_line() {
    // (config text, a key the message must name, the line it must name)
    let cases: &[(&str, &str, Option<usize>)] = &[
        (
            "[daemon]\nrefresh_lead = \"10x\"\n",
            "refresh_lead",
            Some(2),
        ),
        ("[daemon]\nrefresh_lead = 600\n", "refresh_lead", Some(2)),
        (
            "[daemon]\nrefresh_leed = \"10m\"\n",
            "refresh_leed",
            Some(2),
        ),
        (
            "[daemon]\n\nmax_concurrent_refreshes = 0\n",
            "max_concurrent_refreshes",
            Some(3),
        ),
        ("[daemon]\nlog_level = \"loud\"\n", "log_level", Some(2)),
        ("[daemon]\nlog_format = \"xml\"\n", "log_format", Some(2)),
        ("[daemon]\nlease = \"1s\"\n", "lease", Some(2)),
        (
            "[daemon]\nrevocation_schedule = \"*/15 * * * *\"\n",
            "revocation_schedule",
            Some(2),
        ),
        (
            "[daemon]\nrevocation_confirm_delay = \"5s\"\n",
            "revocation_confirm_delay",
            Some(2),
        ),
        (
            "[daemon]\nrefresh_token_margin = \"8d\"\n",
            "refresh_token_margin",
            Some(2),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\nbase_url = \"not a url\"\n",
            "base_url",
            Some(5),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\nbase_url = \"ftp://x\"\n",
            "base_url",
            Some(5),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\nenvironment = \"staging\"\n",
            "environment",
            Some(5),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\ncolour = \"blue\"\n",
            "colour",
            Some(5),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\n",
            "client_secret",
            Some(2),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret_file = \"/nonexistent/secret\"\n",
            "client_secret_file",
            Some(4),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret_env = \"TOKEND_TEST_UNSET_VARIABLE\"\n",
            "client_secret_env",
            Some(4),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\n\n[[profile]]\nname = \"p\"\nclient_id = \"b\"\nclient_secret = \"t\"\n",
            "name",
            Some(7),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\nprobe = \"url\"\n",
            "probe_url",
            Some(2),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\ntoken_type = \"robot\"\n",
            "token_type",
            Some(5),
        ),
        ("[daemon]\ndatabase = \"/tmp/x.db\"\n", "profile", None),
        (
            "[daemon]\nmin_refresh_interval = \"500ms\"\n",
            "min_refresh_interval",
            Some(2),
        ),
        (
            "[daemon]\n\nmax_token_requests_per_hour = 0\n",
            "max_token_requests_per_hour",
            Some(3),
        ),
        (
            "[daemon]\nmax_token_requests_per_hour = -1\n",
            "max_token_requests_per_hour",
            Some(2),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\ndefault_token_lifetime = \"30s\"\n",
            "default_token_lifetime",
            Some(5),
        ),
        (
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\nrevoke_superseded = \"yes\"\n",
            "revoke_superseded",
            Some(5),
        ),
    ];
    for (text, key, line) in cases {
        let err = parse(text).expect_err(text);
        assert!(
            err.starts_with("/etc/tokend/tokend.toml"),
            "no file name in {err:?}"
        );
        assert!(
            err.contains(key),
            "error for {text:?} does not name {key:?}: {err}"
        );
        if let Some(line) = line {
            assert!(
                err.contains(&format!("tokend.toml:{line}:")),
                "error for {text:?} does not name line {line}: {err}"
            );
        }
    }
}

#[test]
fn validation_errors_name_the_line_of_the_key_in_its_own_table() {
    // The same key in two profiles: the error is the second profile's, and so is the line.
    let text = "\
[[profile]]
name = \"first\"
client_id = \"a\"
client_secret = \"s\"

[[profile]]
name = \"second\"
client_id = \"   \"
client_secret = \"t\"
";
    let err = parse(text).expect_err("blank client_id");
    assert!(
        err.starts_with("/etc/tokend/tokend.toml:8: profile \"second\": client_id:"),
        "{err}"
    );

    // `lease = ...` written inside a multi-line string above the real key is not the key.
    let text = "\
[[profile]]
name = \"p\"
client_id = \"\"\"
lease = \"60s\"
\"\"\"
client_secret = \"s\"

[daemon]
lease = \"1s\"
";
    let err = parse(text).expect_err("lease shorter than http_timeout");
    assert!(
        err.starts_with("/etc/tokend/tokend.toml:9: daemon.lease:"),
        "{err}"
    );
}

/// A one-profile config with `extra` lines appended to the profile (from line 6 on).
fn with_profile_lines(extra: &str) -> String {
    format!("{GOOD_PROFILE}{extra}\n")
}

#[test]
fn shutdown_timeout_must_cover_a_request_in_flight() {
    let err = parse(&format!(
        "[daemon]\nhttp_timeout = \"15s\"\nshutdown_timeout = \"10s\"\n{GOOD_PROFILE}"
    ))
    .expect_err("shutdown shorter than a request");
    assert!(
        err.starts_with("/etc/tokend/tokend.toml:3: daemon.shutdown_timeout"),
        "{err}"
    );
    assert!(err.contains("abandoned with their rotated tokens"), "{err}");
    // Only http_timeout written: the default shutdown_timeout (20s) is too short for it.
    let err = parse(&format!("[daemon]\nhttp_timeout = \"30s\"\n{GOOD_PROFILE}"))
        .expect_err("default shutdown shorter than a request");
    assert!(
        err.starts_with("/etc/tokend/tokend.toml:2: daemon.shutdown_timeout"),
        "{err}"
    );
    parse(&format!(
        "[daemon]\nhttp_timeout = \"20s\"\nshutdown_timeout = \"20s\"\n{GOOD_PROFILE}"
    ))
    .expect("equal is enough");
}

#[test]
fn urls_must_be_https_unless_loopback_or_explicitly_allowed() {
    for ok in [
        "https://api.example.com",
        "http://127.0.0.1:8080",
        "http://127.3.2.1",
        "http://[::1]:8080/oauth",
        "http://localhost:9000",
    ] {
        let c = parse(&with_profile_lines(&format!("base_url = \"{ok}\""))).expect(ok);
        assert_eq!(
            c.warnings.len(),
            1,
            "only the inline secret warns for {ok}: {:?}",
            c.warnings
        );
    }
    let err = parse(&with_profile_lines("base_url = \"http://api.example.com\""))
        .expect_err("plain http");
    assert!(
        err.starts_with("/etc/tokend/tokend.toml:6: profile \"factorial\": base_url:"),
        "{err}"
    );
    assert!(err.contains("allow_insecure_http"), "{err}");
    let err = parse(&with_profile_lines(
        "probe = \"url\"\nprobe_url = \"http://10.0.0.1/me\"",
    ))
    .expect_err("plain http probe");
    assert!(
        err.starts_with("/etc/tokend/tokend.toml:7: profile \"factorial\": probe_url:"),
        "{err}"
    );

    let c = parse(&with_profile_lines(
        "allow_insecure_http = true\nbase_url = \"http://api.example.com\"",
    ))
    .expect("allowed");
    let warning = c
        .warnings
        .iter()
        .find(|w| w.contains("base_url"))
        .unwrap_or_else(|| panic!("no warning: {:?}", c.warnings));
    assert!(
        warning.starts_with("/etc/tokend/tokend.toml:7:")
            && warning.contains("\"factorial\"")
            && warning.contains("client secret")
            && warning.contains("cleartext"),
        "{warning}"
    );
}

#[test]
fn urls_with_user_info_are_refused_without_echoing_the_password() {
    for (line, key) in [
        (
            "base_url = \"https://admin:hunter2@api.example.com\"",
            "base_url",
        ),
        ("base_url = \"https://admin@api.example.com\"", "base_url"),
        (
            "probe = \"url\"\nprobe_url = \"https://admin:hunter2@api.example.com/me\"",
            "probe_url",
        ),
        // Not a URL at all, and the error quotes the line: still no password.
        (
            "base_url = \"https://admin:hunter2@api example.com\"",
            "base_url",
        ),
    ] {
        let err = parse(&with_profile_lines(line)).expect_err(line);
        assert!(err.contains(key), "{err}");
        assert!(!err.contains("hunter2"), "password echoed: {err}");
        let line_no = 5 + line.lines().count();
        assert!(err.contains(&format!("tokend.toml:{line_no}:")), "{err}");
    }
    let err = parse("[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"hunter2\n")
        .expect_err("unterminated string");
    assert!(!err.contains("hunter2"), "inline secret echoed: {err}");
}

#[test]
fn a_refresh_lead_over_half_an_hour_warns() {
    let c = parse(&format!("[daemon]\nrefresh_lead = \"30m\"\n{GOOD_PROFILE}")).expect("valid");
    assert!(
        !c.warnings.iter().any(|w| w.contains("refresh_lead")),
        "{:?}",
        c.warnings
    );
    let c = parse(&format!("[daemon]\nrefresh_lead = \"45m\"\n{GOOD_PROFILE}")).expect("valid");
    let warning = c
        .warnings
        .iter()
        .find(|w| w.contains("refresh_lead"))
        .unwrap_or_else(|| panic!("no warning: {:?}", c.warnings));
    assert!(
        warning.starts_with("/etc/tokend/tokend.toml:2:")
            && warning.contains("half the token's lifetime"),
        "{warning}"
    );
}

#[test]
fn revocation_schedules_that_fire_too_often_or_never_are_refused() {
    for (cron, says) in [
        ("*/10 * * * * *", "more often than once a minute"),
        ("0-30 * * * * *", "more often than once a minute"),
        ("0,30 0 0 1 1 *", "more often than once a minute"),
        ("0 0 0 31 2 *", "does not fire within the next year"),
    ] {
        let err = parse(&format!(
            "[daemon]\nlog_level = \"info\"\nrevocation_schedule = \"{cron}\"\n{GOOD_PROFILE}"
        ))
        .expect_err(cron);
        assert!(
            err.starts_with("/etc/tokend/tokend.toml:3: daemon.revocation_schedule:"),
            "{err}"
        );
        assert!(err.contains(says), "{err}");
        if says.contains("minute") {
            // Three fire times, RFC 3339 UTC, after "next: ".
            let listed = err.split("next: ").nth(1).unwrap_or_default();
            let times: Vec<_> = listed
                .split([',', ')'])
                .take(3)
                .map(|t| chrono::DateTime::parse_from_rfc3339(t.trim()))
                .collect();
            assert!(times.iter().all(|t| t.is_ok()), "{err}");
        }
    }
    for cron in [
        "0 */15 * * * *",
        "0 * * * * *",
        "0 0 0 1 1 *",
        "0 30 2 * * 1-5",
    ] {
        parse(&format!(
            "[daemon]\nrevocation_schedule = \"{cron}\"\n{GOOD_PROFILE}"
        ))
        .unwrap_or_else(|e| panic!("{cron}: {e}"));
    }
}

fn with_secret_file(file: &Path) -> Result<Config, String> {
    parse(&format!(
        "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret_file = \"{}\"\n",
        file.display()
    ))
}

#[test]
fn secret_files_must_be_small_regular_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let started = std::time::Instant::now();
    for (file, says) in [
        (Path::new("/dev/zero"), "a device, not a regular file"),
        (fifo.as_path(), "a FIFO, not a regular file"),
        (dir.path(), "a directory, not a regular file"),
    ] {
        let err = with_secret_file(file).expect_err("not a regular file");
        assert!(
            err.starts_with("/etc/tokend/tokend.toml:4: profile \"p\": client_secret_file:")
                && err.contains(says),
            "{err}"
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "slow refusal"
    );

    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 100 * 1024]).expect("write");
    let err = with_secret_file(&big).expect_err("100 KiB");
    assert!(err.contains("larger than 64 KiB"), "{err}");
}

#[test]
fn a_secret_file_others_can_read_warns() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("secret");
    std::fs::write(&file, "  s3cret\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let c = with_secret_file(&file).expect("valid");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = &c.warnings[0];
    assert!(
        w.contains(&file.display().to_string()) && w.contains("0644") && w.contains("chmod 600"),
        "{w}"
    );
    {
        use secrecy::ExposeSecret;
        assert_eq!(
            c.profiles[0].client_secret.expose_secret(),
            "s3cret",
            "trimmed"
        );
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let c = with_secret_file(&file).expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

/// `tokend check-config` on the example config, outside systemd, with these credential stores.
fn check_example_config(credstore_path: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokend.toml"),
            "check-config",
        ])
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("TOKEND_CREDSTORE_PATH", credstore_path)
        .output()
        .expect("run")
}

#[test]
fn credentials_are_found_in_the_credential_stores_outside_systemd() {
    use std::os::unix::fs::PermissionsExt;
    let empty = tempfile::tempdir().expect("tempdir");
    let store = tempfile::tempdir().expect("tempdir");
    let search = format!("{}:{}", empty.path().display(), store.path().display());

    let out = check_example_config(&search);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for dir in [empty.path(), store.path()] {
        let place = dir.join("factorial-client-secret");
        assert!(stderr.contains(&place.display().to_string()), "{stderr}");
    }
    assert!(stderr.contains("client_secret_credential"), "{stderr}");

    let secret = store.path().join("factorial-client-secret");
    std::fs::write(&secret, "s3cret\n").expect("credential");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = check_example_config(&search);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn profile_for_picks_the_named_profile_or_the_only_one() {
    let one = parse(GOOD_PROFILE).expect("valid");
    assert_eq!(
        one.single_profile().map(|p| p.name.as_str()),
        Some("factorial")
    );
    for name in [None, Some(""), Some("factorial")] {
        assert_eq!(
            one.profile_for(name).map(|p| p.name.as_str()),
            Some("factorial"),
            "{name:?}"
        );
    }
    assert!(one.profile_for(Some("other")).is_none());

    let two = parse(&format!(
        "{GOOD_PROFILE}\n[[profile]]\nname = \"other\"\nclient_id = \"b\"\nclient_secret = \"t\"\n"
    ))
    .expect("valid");
    assert!(two.single_profile().is_none());
    assert!(two.profile_for(None).is_none());
    assert!(two.profile_for(Some("")).is_none());
    assert_eq!(
        two.profile_for(Some("other")).map(|p| p.client_id.as_str()),
        Some("b")
    );
}

#[test]
fn durations_use_humantime_syntax_and_still_need_a_unit() {
    use tokend::config::parse_duration;
    let secs = |s: &str| parse_duration(s).map(|d| d.as_secs_f64());
    assert_eq!(secs("1h30m"), Some(5400.0));
    assert_eq!(secs("1h 30m"), Some(5400.0));
    assert_eq!(secs("90min"), Some(5400.0));
    assert_eq!(secs("2weeks"), Some(14.0 * 86_400.0));
    assert_eq!(secs("500ms"), Some(0.5));
    assert_eq!(secs("10"), None, "a bare number has no unit");
    assert_eq!(secs("11y"), None, "over the ten-year ceiling");
    let c = parse(&format!("[daemon]\nretry_max = \"1h 30m\"\n{GOOD_PROFILE}")).expect("valid");
    assert_eq!(c.daemon.retry_max.get().as_secs(), 5400);
    let err = parse("[daemon]\nretry_max = \"10\"\n").expect_err("no unit");
    assert!(
        err.contains("tokend.toml:2:") && err.contains("retry_max") && err.contains("with a unit"),
        "{err}"
    );
}

#[test]
fn every_file_in_config_dir_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut found = 0;
    for entry in std::fs::read_dir(&dir).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load_without_secrets(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            found += 1;
        }
    }
    assert!(found >= 1, "no config files found in {}", dir.display());
}

#[test]
fn example_config_loads_with_its_credential() {
    // The full load, secrets included, as systemd would run it.
    let creds = tempfile::tempdir().expect("tempdir");
    std::fs::write(creds.path().join("factorial-client-secret"), "s3cret").expect("credential");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokend.toml"),
            "check-config",
        ])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
