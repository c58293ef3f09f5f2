//! Linking accounts from JSON (`tokend accounts import`, the API): parse each row, check it with
//! the engine's one validator, and hand the store all of them or none.

use std::collections::HashSet;

use secrecy::SecretString;
use serde_json::Value;

use crate::config::{Config, TokenType};
use crate::engine::policy::{self, Fields, Invalid};
use crate::store::NewAccount;

/// Parse and check an import file. On any bad row, every problem is returned, by row index.
pub fn parse_import(config: &Config, text: &str) -> Result<Vec<NewAccount>, Vec<String>> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| vec![format!("not valid JSON: {e}")])?;
    let Some(rows) = doc.get("accounts").and_then(Value::as_array) else {
        return Err(vec![
            "expected an object with an \"accounts\" array: {\"accounts\":[{\"id\":...}]}".into(),
        ]);
    };
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(rows.len());
    let mut seen = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        let label = row
            .get("id")
            .and_then(Value::as_str)
            .map(|id| format!("row {i} (id {id:?})"))
            .unwrap_or_else(|| format!("row {i}"));
        match parse_row(config, row) {
            Ok(a) => {
                if !seen.insert(a.id.clone()) {
                    errors.push(format!("{label}: duplicate id in this file"));
                } else {
                    out.push(a);
                }
            }
            Err(e) => errors.push(format!("{label}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The fields an account may carry when linked.
pub const FIELDS: [&str; 8] = [
    "id",
    "profile",
    "token_type",
    "access_token",
    "refresh_token",
    "expires_at",
    "scopes",
    "scope",
];

fn bad(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

/// Parse one account object (an import row, an API body) and check it; the error names the
/// field at fault.
pub fn parse_row(config: &Config, row: &Value) -> Result<NewAccount, Invalid> {
    let obj = row
        .as_object()
        .ok_or_else(|| bad("", "not a JSON object"))?;
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(bad("", format!("unknown field {k:?}")));
    }
    let text = |key: &'static str| -> Result<Option<String>, Invalid> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(key, format!("{key} must be a string or null"))),
        }
    };
    let id = text("id")?.ok_or_else(|| bad("id", "id is missing"))?;
    let named = text("profile")?.filter(|p| !p.is_empty());
    let default_type = config
        .profile_for(named.as_deref())
        .map(|p| p.token_type)
        .unwrap_or(TokenType::User);
    let token_type = match text("token_type")? {
        None => default_type,
        Some(t) => TokenType::parse(&t).ok_or_else(|| {
            bad(
                "token_type",
                format!("token_type {t:?} is not \"user\" or \"company\""),
            )
        })?,
    };
    let access = text("access_token")?.filter(|s| !s.trim().is_empty());
    let refresh = text("refresh_token")?.filter(|s| !s.trim().is_empty());
    let expires_at = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|t| *t > 0 && *t < 253_402_300_800)
                .ok_or_else(|| {
                    bad(
                        "expires_at",
                        "expires_at must be a unix time in seconds (or null: refreshed at once)",
                    )
                })?,
        ),
    };
    let profile = policy::check(
        config,
        &Fields {
            id: &id,
            profile: named.as_deref(),
            token_type,
            has_access: access.is_some(),
            has_refresh: refresh.is_some(),
        },
    )?;
    let scopes = match obj.get("scopes").or_else(|| obj.get("scope")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad("scopes", "scopes must be strings"))
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(" "),
        ),
        Some(_) => {
            return Err(bad(
                "scopes",
                "scopes must be a string or an array of strings",
            ));
        }
    };
    Ok(NewAccount {
        id,
        profile: Some(profile.name.clone()),
        token_type,
        access_token: access.map(SecretString::from),
        refresh_token: refresh.map(SecretString::from),
        expires_at,
        scopes,
    })
}
