//! Process-wide sets of container ids that an operation under way marks (a `stop`, a
//! `move_start`, a move that froze the container), for other requests to look at.

use std::sync::Mutex;

/// A set of marked container ids (an id may be marked more than once: each [`Mark`] counts).
pub(crate) struct Marks(Mutex<Vec<String>>);

impl Marks {
    pub(crate) const fn new() -> Marks {
        Marks(Mutex::new(Vec::new()))
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The marked ids, each once.
    pub(crate) fn distinct(&self) -> std::collections::BTreeSet<String> {
        self.ids().iter().cloned().collect()
    }

    /// Whether `id` is marked.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.ids().iter().any(|x| x == id)
    }

    /// Marks `id` (once, whatever it was) or clears every mark of it.
    pub(crate) fn set(&self, id: &str, on: bool) {
        let mut g = self.ids();
        g.retain(|x| x != id);
        if on {
            g.push(id.to_owned());
        }
    }

    /// Marks `id` until the returned guard drops.
    pub(crate) fn hold(&'static self, id: &str) -> Mark {
        self.ids().push(id.to_owned());
        Mark {
            marks: self,
            id: id.to_owned(),
        }
    }

    /// Marks `id` until the returned guard drops, unless it is marked already (checked and
    /// marked under one lock).
    pub(crate) fn try_hold(&'static self, id: &str) -> Option<Mark> {
        let mut g = self.ids();
        if g.iter().any(|x| x == id) {
            return None;
        }
        g.push(id.to_owned());
        Some(Mark {
            marks: self,
            id: id.to_owned(),
        })
    }
}

/// One mark of an id in a [`Marks`], removed on drop.
pub(crate) struct Mark {
    marks: &'static Marks,
    id: String,
}

impl Drop for Mark {
    fn drop(&mut self) {
        let mut g = self.marks.ids();
        if let Some(i) = g.iter().position(|x| *x == self.id) {
            g.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_count_and_set_clears() {
        static M: Marks = Marks::new();
        let a = M.hold("a");
        let b = M.hold("a");
        assert!(M.try_hold("a").is_none());
        drop(a);
        assert!(M.contains("a"));
        drop(b);
        assert!(!M.contains("a"));
        let c = M.try_hold("a").unwrap();
        assert!(M.try_hold("a").is_none());
        drop(c);
        M.set("x", true);
        M.set("x", true);
        assert!(M.contains("x"));
        M.set("x", false);
        assert!(!M.contains("x"));
    }
}
