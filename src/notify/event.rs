//! The notification as receivers see it: one JSON body (the same bytes on every attempt), and
//! for exec sinks the same fields as `TOKEND_EVENT_*` variables. Built from the stored
//! notification only: ids, states, reasons and times, never a token or secret.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::clock::rfc3339;
use crate::store::{Delivery, SummaryDetails};

#[derive(Debug, Serialize)]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    account_id: Option<&'a str>,
    profile: Option<&'a str>,
    from_state: Option<&'a str>,
    to_state: Option<&'a str>,
    reason: Option<String>,
    occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
}

/// What a `profile.summary` adds.
#[derive(Debug, Serialize)]
struct Summary {
    /// Notifications folded into it, and the distinct accounts among them.
    count: u64,
    accounts_total: u64,
    by_type: BTreeMap<String, u64>,
    /// The first 100 accounts.
    accounts: Vec<String>,
    first_at: String,
    last_at: String,
}

/// The JSON body of a notification.
pub fn body(d: &Delivery) -> String {
    let details: Option<SummaryDetails> = d
        .details
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok());
    let reason = match &details {
        Some(s) => Some(summary_reason(s)),
        None => d.reason.clone(),
    };
    let b = Body {
        id: &d.id,
        kind: &d.kind,
        account_id: d.account_id.as_deref(),
        profile: d.profile.as_deref(),
        from_state: d.from_state.as_deref(),
        to_state: d.to_state.as_deref(),
        reason,
        occurred_at: rfc3339(d.occurred_at),
        summary: details.map(|s| Summary {
            count: s.count,
            accounts_total: s.accounts_total,
            by_type: s.by_type,
            accounts: s.accounts,
            first_at: rfc3339(s.first_at),
            last_at: rfc3339(s.last_at),
        }),
    };
    serde_json::to_string(&b).unwrap_or_default()
}

/// "412 accounts failing since 10:02 UTC", or for several kinds "415 account notifications
/// since 10:02 UTC: 412 failing, 3 needs_reauth".
pub fn summary_reason(s: &SummaryDetails) -> String {
    let since = chrono::DateTime::from_timestamp(s.first_at, 0)
        .map(|t| t.format("%H:%M UTC").to_string())
        .unwrap_or_default();
    let short = |t: &str| t.rsplit('.').next().unwrap_or(t).to_owned();
    if let [(kind, n)] = s.by_type.iter().collect::<Vec<_>>().as_slice() {
        let what = match kind.as_str() {
            "account.needs_reauth" => "needing reauthorisation".to_owned(),
            "account.refresh_token_at_risk" => "with a refresh token at risk".to_owned(),
            "account.lapse" => "with a lapsed access token".to_owned(),
            other => short(other),
        };
        return format!(
            "{n} {} {what} since {since}",
            if **n == 1 { "account" } else { "accounts" }
        );
    }
    let parts: Vec<String> = s
        .by_type
        .iter()
        .map(|(t, n)| format!("{n} {}", short(t)))
        .collect();
    format!(
        "{} account notifications since {since}: {}",
        s.count,
        parts.join(", ")
    )
}

/// The `TOKEND_EVENT_*` variables an exec sink's command gets (absent fields are left out).
pub fn env(d: &Delivery) -> Vec<(&'static str, String)> {
    let reason = d
        .details
        .as_deref()
        .and_then(|t| serde_json::from_str::<SummaryDetails>(t).ok())
        .map(|s| summary_reason(&s))
        .or_else(|| d.reason.clone());
    [
        ("TOKEND_EVENT_ID", Some(d.id.clone())),
        ("TOKEND_EVENT_TYPE", Some(d.kind.clone())),
        ("TOKEND_EVENT_ACCOUNT_ID", d.account_id.clone()),
        ("TOKEND_EVENT_PROFILE", d.profile.clone()),
        ("TOKEND_EVENT_FROM_STATE", d.from_state.clone()),
        ("TOKEND_EVENT_TO_STATE", d.to_state.clone()),
        ("TOKEND_EVENT_REASON", reason),
        ("TOKEND_EVENT_OCCURRED_AT", Some(rfc3339(d.occurred_at))),
        ("TOKEND_EVENT_ATTEMPT", Some(d.attempts.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> Delivery {
        Delivery {
            ord: 1,
            sink: "ops".into(),
            id: "abc:7".into(),
            seq: 7,
            kind: "account.needs_reauth".into(),
            account_id: Some("user-1".into()),
            profile: Some("factorial".into()),
            from_state: Some("active".into()),
            to_state: Some("needs_reauth".into()),
            reason: Some("invalid_grant: revoked".into()),
            occurred_at: 0,
            details: None,
            attempts: 1,
            queued_at: 0,
        }
    }

    #[test]
    fn the_body_has_the_documented_fields_in_order() {
        assert_eq!(
            body(&delivery()),
            r#"{"id":"abc:7","type":"account.needs_reauth","account_id":"user-1","profile":"factorial","from_state":"active","to_state":"needs_reauth","reason":"invalid_grant: revoked","occurred_at":"1970-01-01T00:00:00Z"}"#
        );
    }

    #[test]
    fn a_summary_says_how_many_and_since_when() {
        let mut s = SummaryDetails {
            count: 412,
            accounts_total: 412,
            first_at: 10 * 3600 + 120,
            last_at: 10 * 3600 + 170,
            ..Default::default()
        };
        s.by_type.insert("account.failing".into(), 412);
        assert_eq!(summary_reason(&s), "412 accounts failing since 10:02 UTC");
        s.by_type.insert("account.needs_reauth".into(), 3);
        s.count = 415;
        assert_eq!(
            summary_reason(&s),
            "415 account notifications since 10:02 UTC: 412 failing, 3 needs_reauth"
        );
        let mut d = delivery();
        d.kind = "profile.summary".into();
        d.account_id = None;
        d.details = Some(serde_json::to_string(&s).expect("json"));
        let b: serde_json::Value = serde_json::from_str(&body(&d)).expect("json");
        assert_eq!(b["summary"]["count"], 415);
        assert_eq!(b["reason"], summary_reason(&s));
    }
}
