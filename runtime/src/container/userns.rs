//! Host id ranges of user-namespace containers: each container gets its own range of 65536 ids,
//! recorded in its spec and kept across checkpoint, restore and moves (CRIU restores the user
//! namespace with the dumped maps, so a destination must validate that the range is free there;
//! it cannot pick another without shifting the owners of every file in the writable layer).
//!
//! Ranges are slots `BASE + k * SIZE`. A container prefers the slot named by its id (random hex),
//! so two hosts that allocate independently rarely pick the same range for different containers;
//! when the preferred slot is taken here, the next free one is used.

use crate::spec::IdMap;

/// The first host id of slot 0 (the conventional start of `/etc/subuid` ranges).
pub const BASE: u32 = 100_000;
/// Ids per container (uids and gids alike).
pub const SIZE: u32 = 65_536;
/// Number of slots: the last one ends below 2^31 (some tools treat ids as signed).
pub const SLOTS: u32 = 16_384;

/// The range of slot `k` (`k < SLOTS`).
pub fn slot(k: u32) -> IdMap {
    IdMap {
        host_id: BASE + (k % SLOTS) * SIZE,
        size: SIZE,
    }
}

/// Whether two ranges share a host id.
pub fn overlaps(a: &IdMap, b: &IdMap) -> bool {
    let end = |m: &IdMap| u64::from(m.host_id) + u64::from(m.size);
    u64::from(a.host_id) < end(b) && u64::from(b.host_id) < end(a)
}

/// A free range for container `id` given the ranges in use on this host: the slot named by the
/// id's first 8 hex digits when free, else the next free one; `None` when all are taken.
pub fn allocate<'a>(id: &str, used: impl IntoIterator<Item = &'a IdMap>) -> Option<IdMap> {
    let used: Vec<IdMap> = used.into_iter().copied().collect();
    let first = id
        .get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0)
        % SLOTS;
    (0..SLOTS)
        .map(|i| slot(first.wrapping_add(i) % SLOTS))
        .find(|m| !used.iter().any(|u| overlaps(m, u)))
}

/// The first range in `used` that overlaps `map`, if any.
pub fn clash<'a>(map: &IdMap, used: impl IntoIterator<Item = &'a IdMap>) -> Option<IdMap> {
    used.into_iter().copied().find(|u| overlaps(map, u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_slot_then_next_free() {
        let id = "00000003aaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(allocate(id, []), Some(slot(3)));
        let taken = [slot(3), slot(4)];
        assert_eq!(allocate(id, &taken), Some(slot(5)));
        // The old fixed range (slot 0) and a foreign range overlapping slot 3 both block it.
        let foreign = IdMap {
            host_id: BASE + 3 * SIZE + 10,
            size: 5,
        };
        assert_eq!(allocate(id, &[foreign]), Some(slot(4)));
        // Wraps around the end.
        let last = format!("{:08x}{}", SLOTS - 1, "a".repeat(24));
        assert_eq!(allocate(&last, &[slot(SLOTS - 1)]), Some(slot(0)));
    }

    #[test]
    fn every_slot_is_valid_and_disjoint() {
        let last = slot(SLOTS - 1);
        assert!(u64::from(last.host_id) + u64::from(last.size) <= 1 << 31);
        assert!(!overlaps(&slot(1), &slot(2)));
        assert!(overlaps(&slot(1), &slot(1)));
        let all: Vec<IdMap> = (0..SLOTS).map(slot).collect();
        assert_eq!(allocate("ffffffff", &all), None);
        assert_eq!(clash(&slot(7), &all), Some(slot(7)));
        assert_eq!(clash(&slot(7), &all[..7]), None);
    }
}
