//! An ordered list of block keys with O(1) push, move, remove and pop: a
//! doubly linked list over a slab of nodes, indexed by a hash map. The
//! building block of the LRU, ARC, S3-FIFO and LFU policies.

use crate::keymap::KeyMap;
use qvl_core::BlockKey;

const NIL: u32 = u32::MAX;

struct Node<V> {
    key: BlockKey,
    value: V,
    prev: u32,
    next: u32,
}

/// Keys in order from front (most recent) to back (oldest), each with a value.
pub struct KeyList<V> {
    nodes: Vec<Node<V>>,
    free: Vec<u32>,
    index: KeyMap<u32>,
    head: u32,
    tail: u32,
}

impl<V> Default for KeyList<V> {
    fn default() -> Self {
        KeyList {
            nodes: Vec::new(),
            free: Vec::new(),
            index: KeyMap::default(),
            head: NIL,
            tail: NIL,
        }
    }
}

impl<V> KeyList<V> {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The value stored with `key`.
    pub fn get_mut(&mut self, key: &BlockKey) -> Option<&mut V> {
        let i = *self.index.get(key)?;
        Some(&mut self.nodes[i as usize].value)
    }

    /// Adds `key` at the front; a key already present is moved there and
    /// gets the new value.
    pub fn push_front(&mut self, key: BlockKey, value: V) {
        if let Some(&i) = self.index.get(&key) {
            self.nodes[i as usize].value = value;
            self.unlink(i);
            self.link_front(i);
            return;
        }
        let node = Node {
            key,
            value,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                // More than 4 billion tracked keys would need more memory
                // than any cache level this crate manages.
                (self.nodes.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
        self.link_front(i);
    }

    /// Moves `key` to the front; returns whether it was present.
    pub fn move_to_front(&mut self, key: &BlockKey) -> bool {
        match self.index.get(key) {
            Some(&i) => {
                self.unlink(i);
                self.link_front(i);
                true
            }
            None => false,
        }
    }

    /// Removes `key` and returns its value.
    pub fn remove(&mut self, key: &BlockKey) -> Option<V>
    where
        V: Copy,
    {
        let i = self.index.remove(key)?;
        self.unlink(i);
        self.free.push(i);
        Some(self.nodes[i as usize].value)
    }

    /// The oldest key and its value.
    pub fn back(&self) -> Option<(BlockKey, &V)> {
        (self.tail != NIL).then(|| {
            let n = &self.nodes[self.tail as usize];
            (n.key, &n.value)
        })
    }

    /// Removes and returns the oldest key and its value.
    pub fn pop_back(&mut self) -> Option<(BlockKey, V)>
    where
        V: Copy,
    {
        let key = self.back()?.0;
        self.remove(&key).map(|v| (key, v))
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn link_front(&mut self, i: u32) {
        let old_head = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old_head;
        }
        if old_head == NIL {
            self.tail = i;
        } else {
            self.nodes[old_head as usize].prev = i;
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u128) -> BlockKey {
        BlockKey(i)
    }

    #[test]
    fn keeps_order_through_moves_and_removes() {
        let mut l = KeyList::new();
        for i in 0..5 {
            l.push_front(k(i), i as u32);
        }
        assert!(l.move_to_front(&k(0)));
        assert_eq!(l.remove(&k(2)), Some(2));
        assert!(l.get_mut(&k(2)).is_none());
        let mut order = Vec::new();
        while let Some((key, v)) = l.pop_back() {
            assert_eq!(key.0 as u32, v);
            order.push(key.0);
        }
        assert_eq!(order, vec![1, 3, 4, 0]);
        assert!(l.is_empty());
        // Slots are reused after removal.
        l.push_front(k(9), 9);
        assert_eq!(l.nodes.len(), 5);
        assert_eq!(l.back().map(|(key, _)| key), Some(k(9)));
    }
}
