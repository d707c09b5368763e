//! A bounded map whose entries expire: when full, the oldest insertion goes first. Used for
//! identity lookups and for seen service-auth token ids.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

pub struct TtlCache<K, V> {
    capacity: usize,
    map: HashMap<K, Entry<V>>,
    /// Insertion order; entries replaced or removed since are skipped lazily.
    order: VecDeque<(u64, K)>,
    next_seq: u64,
}

struct Entry<V> {
    seq: u64,
    inserted: Instant,
    expires: Instant,
    value: V,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        TtlCache { capacity: capacity.max(1), map: HashMap::new(), order: VecDeque::new(), next_seq: 0 }
    }

    /// The live value and when it was inserted; an expired entry is dropped.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<(V, Instant)> {
        match self.map.get(key) {
            Some(e) if e.expires > now => Some((e.value.clone(), e.inserted)),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&mut self, key: K, value: V, now: Instant, expires: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.map.insert(key.clone(), Entry { seq, inserted: now, expires, value });
        self.order.push_back((seq, key));
        while self.map.len() > self.capacity {
            self.pop_oldest();
        }
        // Stale order entries (replaced keys) are bounded by compacting now and then.
        if self.order.len() > self.capacity.saturating_mul(2).max(16) {
            let map = &self.map;
            self.order.retain(|(seq, k)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
    }

    pub fn remove(&mut self, key: &K) {
        self.map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn pop_oldest(&mut self) {
        while let Some((seq, key)) = self.order.pop_front() {
            if self.map.get(&key).is_some_and(|e| e.seq == seq) {
                self.map.remove(&key);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_expire() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(10);
        c.insert("a", 1, t0, t0 + Duration::from_secs(10));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(9)), Some((1, t0)));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(10)), None);
        assert!(c.is_empty(), "expired entry is dropped on read");
    }

    #[test]
    fn full_cache_evicts_oldest_insertion() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(100);
        let mut c = TtlCache::new(3);
        c.insert("a", 1, t0, far);
        c.insert("b", 2, t0, far);
        c.insert("c", 3, t0, far);
        c.insert("a", 10, t0, far); // re-insert moves "a" to the back
        c.insert("d", 4, t0, far);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&"b", t0), None, "b was the oldest");
        assert_eq!(c.get(&"a", t0).map(|v| v.0), Some(10));
        assert!(c.get(&"c", t0).is_some() && c.get(&"d", t0).is_some());
    }

    #[test]
    fn order_queue_stays_bounded_under_rewrites() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(4);
        for i in 0..1000 {
            c.insert(i % 2, i, t0, t0 + Duration::from_secs(1));
        }
        assert_eq!(c.len(), 2);
        assert!(c.order.len() <= 16, "order has {}", c.order.len());
        c.remove(&0);
        assert_eq!(c.get(&0, t0), None);
    }
}
