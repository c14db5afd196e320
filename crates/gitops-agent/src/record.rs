//! What a sync records in the inventory (pure; [`crate::sync`] writes it): the objects known
//! to exist, and the commit's objects whose creation failed ("attempted", not known to exist).
//!
//! Keeping the two apart is what lets an object that keeps failing cost no inventory write:
//! listed as attempted, a retry neither adds it before applying nor drops it after. Listing it
//! with the objects instead would make it a pruning duty once it leaves Git, and pruning an
//! object that was never created in a namespace the agent may not read fails (403) — the
//! forbidden namespace would then fail the sync that removes it from Git.

use std::collections::BTreeSet;

use crate::object_ref::ObjRef;

/// The two lists of an inventory ([`crate::inventory::encode_with_attempted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Known to exist; in the write before applying, also what the sync may create.
    pub objects: BTreeSet<ObjRef>,
    /// The commit's objects whose creation failed, so not known to exist.
    pub attempted: BTreeSet<ObjRef>,
}

impl Recorded {
    /// Every object a prune may have to delete.
    pub fn all(&self) -> BTreeSet<ObjRef> {
        self.objects.union(&self.attempted).cloned().collect()
    }

    /// Listed only as attempted: a prune that does not find it ours forgets it, no failure.
    pub fn only_attempted(&self, obj: &ObjRef) -> bool {
        self.attempted.contains(obj) && !self.objects.contains(obj)
    }
}

/// The inventory to write before applying `desired`: the previous one plus every object of the
/// commit it lists nowhere, so that a sync cut short cannot orphan what it created. `None` when
/// that adds nothing to an existing inventory: a re-sync, a commit that only removes objects,
/// and a retry of objects that failed before (listed as attempted, where a crash in this retry
/// still leaves them pruned if found ours).
pub fn intent(previous: &Recorded, exists: bool, desired: &BTreeSet<ObjRef>) -> Option<Recorded> {
    let new: Vec<&ObjRef> = desired
        .iter()
        .filter(|o| !previous.objects.contains(*o) && !previous.attempted.contains(*o))
        .collect();
    if new.is_empty() && exists {
        return None;
    }
    let mut intent = previous.clone();
    intent.objects.extend(new.into_iter().cloned());
    Some(intent)
}

/// What the inventory records once the commit is applied, pruning aside. Known to exist:
/// what was `applied`, and what the `previous` inventory listed that the commit still has
/// unless its apply showed it `absent` (its namespace or type is gone: a 404). A failed update
/// of a listed object leaves it listed (it still exists); a failed creation — forbidden,
/// invalid, another owner's — or an apply never reached leaves the object attempted.
pub fn after_apply(
    previous: &Recorded,
    desired: &BTreeSet<ObjRef>,
    applied: &BTreeSet<ObjRef>,
    absent: &BTreeSet<ObjRef>,
) -> Recorded {
    let mut objects = applied.clone();
    objects.extend(
        previous
            .objects
            .intersection(desired)
            .filter(|o| !absent.contains(*o))
            .cloned(),
    );
    let attempted = desired.difference(&objects).cloned().collect();
    Recorded { objects, attempted }
}

/// `now` with the objects still to be pruned, each kept in the list it came from (an object
/// listed as attempted stays forgettable until it is gone).
pub fn with_pending<'a>(
    mut now: Recorded,
    previous: &Recorded,
    pending: impl IntoIterator<Item = &'a ObjRef>,
) -> Recorded {
    for o in pending {
        if previous.objects.contains(o) {
            now.objects.insert(o.clone());
        } else {
            now.attempted.insert(o.clone());
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(names: &[&str]) -> BTreeSet<ObjRef> {
        names
            .iter()
            .map(|n| ObjRef::new("", "ConfigMap", Some("dude"), *n))
            .collect()
    }

    fn recorded(objects: &[&str], attempted: &[&str]) -> Recorded {
        Recorded {
            objects: objs(objects),
            attempted: objs(attempted),
        }
    }

    /// `b` cannot be created (a namespace the agent may not write): the first sync lists it
    /// before applying and moves it to attempted after; each retry of the unchanged commit
    /// then writes nothing, before applying or after.
    #[test]
    fn an_object_that_keeps_failing_to_be_created_costs_retries_no_write() {
        let desired = objs(&["a", "b"]);
        let first = recorded(&["a"], &[]);
        let intent = intent(&first, true, &desired).expect("b is new");
        assert_eq!(intent, recorded(&["a", "b"], &[]));
        let after = after_apply(&first, &desired, &objs(&["a"]), &BTreeSet::new());
        assert_eq!(after, recorded(&["a"], &["b"]), "b is not known to exist");
        // The retry reads what the first sync wrote.
        assert_eq!(
            super::intent(&after, true, &desired),
            None,
            "no write before"
        );
        let again = after_apply(&after, &desired, &objs(&["a"]), &BTreeSet::new());
        assert_eq!(again, after, "no write after");
    }

    #[test]
    fn a_failed_update_of_a_listed_object_keeps_it_listed_as_existing() {
        let previous = recorded(&["a", "b"], &[]);
        let desired = objs(&["a", "b"]);
        let after = after_apply(&previous, &desired, &objs(&["a"]), &BTreeSet::new());
        assert_eq!(after, previous, "b failed but exists: unchanged, no write");
    }

    #[test]
    fn a_listed_object_shown_absent_is_attempted_and_one_that_got_created_is_existing() {
        let previous = recorded(&["a", "gone"], &["late"]);
        let desired = objs(&["a", "gone", "late"]);
        let after = after_apply(&previous, &desired, &objs(&["a", "late"]), &objs(&["gone"]));
        assert_eq!(after, recorded(&["a", "late"], &["gone"]));
    }

    #[test]
    fn what_left_git_is_no_longer_recorded_unless_still_to_be_pruned() {
        let previous = recorded(&["a", "old"], &["never"]);
        let desired = objs(&["a"]);
        let after = after_apply(&previous, &desired, &objs(&["a"]), &BTreeSet::new());
        assert_eq!(after, recorded(&["a"], &[]));
        let pending = objs(&["old", "never"]);
        assert_eq!(
            with_pending(after, &previous, &pending),
            recorded(&["a", "old"], &["never"]),
            "each stays in the list it came from"
        );
        let one = |n| ObjRef::new("", "ConfigMap", Some("dude"), n);
        assert!(previous.only_attempted(&one("never")));
        assert!(!previous.only_attempted(&one("old")));
        assert_eq!(previous.all(), objs(&["a", "old", "never"]));
    }

    #[test]
    fn a_first_sync_always_writes_and_a_resync_or_removal_does_not() {
        let none = Recorded::default();
        assert_eq!(intent(&none, false, &BTreeSet::new()), Some(none.clone()));
        let previous = recorded(&["a", "b"], &[]);
        assert_eq!(intent(&previous, true, &objs(&["a", "b"])), None);
        assert_eq!(intent(&previous, true, &objs(&["a"])), None);
        assert_eq!(
            intent(&previous, true, &objs(&["b", "c"])),
            Some(recorded(&["a", "b", "c"], &[]))
        );
    }
}
