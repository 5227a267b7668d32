//! What `tollgate store copy` writes into the target store: the plan that turns "everything in
//! the source" and "everything already in the target" into the rows to insert and the report.
//! Shared by every backend, which only reads, inserts and commits around it.

use std::collections::{HashMap, HashSet};

use super::{CopyReport, KeyConflict, StoredKey};
use crate::keys::record::{AuditEvent, KeyRecord};

/// The rows one import inserts, in the order to insert them, and what it reports.
pub(super) struct Plan<'a> {
    pub keys: Vec<&'a StoredKey>,
    pub events: Vec<&'a AuditEvent>,
    pub report: CopyReport,
}

/// Plans copying `keys` and `events` (the source's, events oldest first) into a store that
/// holds `have_keys` and `have_events`.
///
/// - A key is identified by its id. One the target lacks is copied whole. One the target has
///   is left as it is: already present when its record is the same, a conflict otherwise.
///   `last_used_at` is not compared: it moves with every use, and the target's replicas keep
///   it up to date after the first copy, so a second copy would otherwise call every key in
///   use a conflict. `updated_at` is not compared either: it stamps a change, it is not one
///   (a revoke and a restore since the first copy leave the same record).
/// - An audit event has no identity of its own that survives a copy (its sequence number is
///   the target's), so an event is identified by all of its fields: key id, org, action,
///   actor, time (milliseconds) and detail. Two events alike in all of them are
///   indistinguishable for every reader of the trail, so they are counted, not merely looked
///   up: a source holding such an event twice and a target holding it once gets one more.
/// - Events of a key in conflict that the target lacks are not copied: the target kept its own
///   record of that key, and its trail must stay the history of that record (a revocation
///   copied into the trail of a key the target still has active would be false). They are
///   counted as skipped in the conflict.
pub(super) fn plan<'a>(
    have_keys: &[StoredKey],
    have_events: &[AuditEvent],
    keys: &'a [StoredKey],
    events: &'a [AuditEvent],
) -> Plan<'a> {
    let have: HashMap<&str, &KeyRecord> =
        have_keys.iter().map(|k| (k.record.id.as_str(), &k.record)).collect();
    let mut report = CopyReport::default();
    let mut to_insert = Vec::new();
    let mut conflicting = HashSet::new();
    for k in keys {
        match have.get(k.record.id.as_str()) {
            None => to_insert.push(k),
            Some(existing) => {
                let fields = differences(&k.record, existing);
                if fields.is_empty() {
                    report.keys_present += 1;
                } else {
                    conflicting.insert(k.record.id.as_str());
                    report.conflicts.push(KeyConflict { id: k.record.id.clone(), fields, events_skipped: 0 });
                }
            }
        }
    }
    report.keys_copied = to_insert.len();

    let mut present: HashMap<&AuditEvent, usize> = HashMap::new();
    for e in have_events {
        *present.entry(e).or_default() += 1;
    }
    let mut to_append = Vec::new();
    for e in events {
        if let Some(n) = present.get_mut(e).filter(|n| **n > 0) {
            *n -= 1;
            report.events_present += 1;
        } else if conflicting.contains(e.key_id.as_str()) {
            if let Some(c) = report.conflicts.iter_mut().find(|c| c.id == e.key_id) {
                c.events_skipped += 1;
            }
        } else {
            to_append.push(e);
        }
    }
    report.events_copied = to_append.len();
    Plan { keys: to_insert, events: to_append, report }
}

/// The names of the fields in which two records of one id differ, `last_used_at` aside (see
/// `plan`). Names only: a conflict report never shows a hash.
fn differences(a: &KeyRecord, b: &KeyRecord) -> Vec<&'static str> {
    // Destructured, so that a field added to the record cannot be forgotten here.
    let KeyRecord {
        id: _,
        name,
        org,
        workspace,
        tier,
        scopes,
        secret_hash,
        created_at,
        expires_at,
        last_used_at: _,
        revoked_at,
        revoked_by,
        rotated_from,
    } = a;
    let mut out = Vec::new();
    let mut note = |differs: bool, field: &'static str| {
        if differs {
            out.push(field);
        }
    };
    note(*name != b.name, "name");
    note(*org != b.org, "org");
    note(*workspace != b.workspace, "workspace");
    note(*tier != b.tier, "tier");
    note(*scopes != b.scopes, "scopes");
    note(*secret_hash != b.secret_hash, "secret_hash");
    note(*created_at != b.created_at, "created_at");
    note(*expires_at != b.expires_at, "expires_at");
    note(*revoked_at != b.revoked_at, "revoked_at");
    note(*revoked_by != b.revoked_by, "revoked_by");
    note(*rotated_from != b.rotated_from, "rotated_from");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> StoredKey {
        StoredKey {
            record: KeyRecord {
                id: id.into(),
                name: "n".into(),
                org: "acme".into(),
                workspace: "default".into(),
                tier: "free".into(),
                scopes: vec!["inference:read".into()],
                secret_hash: "$argon2id$x".into(),
                created_at: 1000,
                expires_at: None,
                last_used_at: None,
                revoked_at: None,
                revoked_by: None,
                rotated_from: None,
            },
            updated_at: 1000,
        }
    }

    fn ev(id: &str, action: &str, at: i64) -> AuditEvent {
        AuditEvent {
            key_id: id.into(),
            org: "acme".into(),
            action: action.into(),
            actor: "cli".into(),
            at,
            detail: None,
        }
    }

    #[test]
    fn an_empty_target_gets_everything_in_order() {
        let keys = [key("a"), key("b")];
        let events = [ev("a", "create", 1), ev("b", "create", 2), ev("a", "revoke", 3)];
        let p = plan(&[], &[], &keys, &events);
        assert_eq!(p.keys.iter().map(|k| k.record.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(p.events, events.iter().collect::<Vec<_>>());
        assert_eq!((p.report.keys_copied, p.report.events_copied), (2, 3));
    }

    #[test]
    fn a_second_copy_copies_nothing() {
        let keys = [key("a")];
        let events = [ev("a", "create", 1), ev("a", "revoke", 3)];
        // The target's replicas have used the key since: not a conflict.
        let mut used = key("a");
        used.record.last_used_at = Some(5000);
        let p = plan(&[used], &events, &keys, &events);
        assert!(p.keys.is_empty() && p.events.is_empty());
        assert_eq!((p.report.keys_present, p.report.events_present), (1, 2));
        assert!(p.report.conflicts.is_empty());
    }

    #[test]
    fn identical_events_are_counted_not_merged() {
        let events = [ev("gone", "purge", 7), ev("gone", "purge", 7)];
        let p = plan(&[], &events[..1], &[], &events);
        assert_eq!((p.report.events_present, p.report.events_copied), (1, 1));
    }

    #[test]
    fn a_differing_key_is_a_conflict_and_keeps_its_trail() {
        let mut revoked = key("a");
        revoked.record.revoked_at = Some(3);
        revoked.record.revoked_by = Some("cli".into());
        let events = [ev("a", "create", 1), ev("a", "revoke", 3), ev("b", "create", 4)];
        let source = [revoked, key("b")];
        let p = plan(&[key("a")], &events[..1], &source, &events);
        assert_eq!(p.report.conflicts.len(), 1);
        let c = &p.report.conflicts[0];
        assert_eq!(
            (c.id.as_str(), c.fields.as_slice(), c.events_skipped),
            ("a", &["revoked_at", "revoked_by"][..], 1)
        );
        assert_eq!(p.keys.iter().map(|k| k.record.id.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(p.events, [&events[2]]);
        assert_eq!((p.report.keys_copied, p.report.keys_present), (1, 0));
    }
}
