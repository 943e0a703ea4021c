//! A role's published nodes: sorted by name, immutable once published, and cheap to change.
//!
//! A [`NodeList`] is a list of chunks, each an `Arc` of fewer than `2 * CHUNK` nodes (a small
//! chunk joins its right neighbour when a removal leaves it under a quarter of `CHUNK`). Publishing a
//! change clones the list of `Arc`s (one per chunk) and copies only the chunks the change
//! touches, so a change to one node of a 20,000-node role costs a few hundred pointer copies,
//! not 20,000 node copies, while every reader keeps its own unchanged list.

use std::sync::Arc;

use super::{Label, PublishedNode};

/// Target chunk size: chunks split in two when they reach twice this.
const CHUNK: usize = 128;

#[derive(Clone, Default, Debug)]
pub struct NodeList {
    /// Non-empty, sorted chunks, each sorted by node name.
    chunks: Vec<Arc<Vec<PublishedNode>>>,
    len: usize,
}

impl NodeList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every node, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &PublishedNode> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The nodes from position `at` on (one step per chunk to get there).
    pub fn iter_from(&self, mut at: usize) -> impl Iterator<Item = &PublishedNode> + '_ {
        let mut first = self.chunks.len();
        for (i, c) in self.chunks.iter().enumerate() {
            if at < c.len() {
                first = i;
                break;
            }
            at -= c.len();
        }
        let skip = if first < self.chunks.len() { at } else { 0 };
        self.chunks[first..]
            .iter()
            .flat_map(|c| c.iter())
            .skip(skip)
    }

    pub fn get(&self, node: &Label) -> Option<&PublishedNode> {
        let c = self.chunks.get(self.chunk_for(node))?;
        let i = c.binary_search_by(|n| n.node.cmp(node)).ok()?;
        Some(&c[i])
    }

    /// Inserts `n`, or replaces the node of the same name.
    pub fn upsert(&mut self, n: PublishedNode) {
        if self.chunks.is_empty() {
            self.chunks.push(Arc::new(vec![n]));
            self.len = 1;
            return;
        }
        let ci = self.chunk_for(&n.node);
        let c = Arc::make_mut(&mut self.chunks[ci]);
        match c.binary_search_by(|x| x.node.cmp(&n.node)) {
            Ok(i) => c[i] = n,
            Err(i) => {
                c.insert(i, n);
                self.len += 1;
                if c.len() >= 2 * CHUNK {
                    let tail = c.split_off(CHUNK);
                    self.chunks.insert(ci + 1, Arc::new(tail));
                }
            }
        }
    }

    pub fn remove(&mut self, node: &Label) -> bool {
        let ci = self.chunk_for(node);
        let Some(c) = self.chunks.get(ci) else {
            return false;
        };
        let Ok(i) = c.binary_search_by(|x| x.node.cmp(node)) else {
            return false;
        };
        let c = Arc::make_mut(&mut self.chunks[ci]);
        c.remove(i);
        self.len -= 1;
        let left = c.len();
        if left == 0 {
            self.chunks.remove(ci);
        } else if left < CHUNK / 4
            && self
                .chunks
                .get(ci + 1)
                .is_some_and(|next| left + next.len() < 2 * CHUNK)
        {
            // A small chunk joins its right neighbour (staying under a split), so that churn
            // cannot leave the list as many tiny chunks.
            let next = self.chunks.remove(ci + 1);
            Arc::make_mut(&mut self.chunks[ci]).extend(next.iter().cloned());
        }
        true
    }

    /// The chunk that holds `node`, or would: the first whose last node is not before it (the
    /// last chunk for a name after every node).
    fn chunk_for(&self, node: &Label) -> usize {
        let i = self
            .chunks
            .partition_point(|c| c.last().is_some_and(|l| l.node < *node));
        i.min(self.chunks.len().saturating_sub(1))
    }

    /// How many chunks there are (tests).
    #[cfg(test)]
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Chunks shared with `other` (tests: a change copies only what it touches).
    #[cfg(test)]
    pub fn shared_chunks(&self, other: &NodeList) -> usize {
        self.chunks
            .iter()
            .filter(|c| other.chunks.iter().any(|o| Arc::ptr_eq(c, o)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::registry::{LeaseCell, NodeSpec};

    fn node(name: &str, weight: u16) -> PublishedNode {
        PublishedNode {
            node: Label::parse(name).unwrap(),
            spec: Arc::new(NodeSpec {
                addr: "10.0.0.1".parse().unwrap(),
                port: None,
                service: crate::registry::Label::parse("http").unwrap(),
                ttl: 5,
                weight,
                meta: Default::default(),
            }),
            encoded: Arc::default(),
            registered: tokio::time::Instant::now(),
            lease: Arc::new(LeaseCell::default()),
        }
    }

    /// Random inserts, replacements and removals agree with a BTreeMap, in order and by name,
    /// and a published list never changes under its reader.
    #[test]
    fn agrees_with_a_sorted_map() {
        let mut list = NodeList::default();
        let mut model: BTreeMap<String, u16> = BTreeMap::new();
        let mut rand = crate::test_rng::lcg(7);
        let mut kept: Vec<(NodeList, Vec<(String, u16)>)> = Vec::new();
        for step in 0..20_000u32 {
            let name = format!("n{}", rand(3000));
            if rand(4) == 0 {
                assert_eq!(
                    list.remove(&Label::parse(&name).unwrap()),
                    model.remove(&name).is_some()
                );
            } else {
                let w = (step % 60000) as u16;
                list.upsert(node(&name, w));
                model.insert(name, w);
            }
            if step % 2000 == 0 {
                kept.push((list.clone(), model.clone().into_iter().collect()));
            }
        }
        let got: Vec<(String, u16)> = list
            .iter()
            .map(|n| (n.node.to_string(), n.spec.weight))
            .collect();
        let want: Vec<(String, u16)> = model.clone().into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(list.len(), model.len());
        for (name, w) in &model {
            assert_eq!(
                list.get(&Label::parse(name).unwrap()).unwrap().spec.weight,
                *w
            );
        }
        assert!(list.get(&Label::parse("zzz").unwrap()).is_none());
        for at in [
            0,
            1,
            127,
            128,
            129,
            500,
            model.len() - 1,
            model.len(),
            model.len() + 5,
        ] {
            let from: Vec<String> = list.iter_from(at).map(|n| n.node.to_string()).collect();
            let want: Vec<String> = model.keys().skip(at).cloned().collect();
            assert_eq!(from, want, "iter_from({at})");
        }
        for (old, want) in kept {
            let got: Vec<(String, u16)> = old
                .iter()
                .map(|n| (n.node.to_string(), n.spec.weight))
                .collect();
            assert_eq!(got, want, "a published list changed under its reader");
        }
    }

    /// Removing most nodes does not leave the list as many tiny chunks.
    #[test]
    fn removals_merge_small_chunks() {
        let mut list = NodeList::default();
        for i in 0..20_000 {
            list.upsert(node(&format!("n{i:05}"), 1));
        }
        for i in (0..20_000).filter(|i| i % 50 != 0) {
            assert!(list.remove(&Label::parse(&format!("n{i:05}")).unwrap()));
        }
        assert_eq!(list.len(), 400);
        assert!(
            list.chunk_count() <= 12,
            "{} chunks for 400 nodes",
            list.chunk_count()
        );
        let names: Vec<String> = list.iter().map(|n| n.node.to_string()).collect();
        let want: Vec<String> = (0..20_000)
            .step_by(50)
            .map(|i| format!("n{i:05}"))
            .collect();
        assert_eq!(names, want);
    }

    #[test]
    fn a_change_copies_one_chunk() {
        let mut list = NodeList::default();
        for i in 0..20_000 {
            list.upsert(node(&format!("n{i:05}"), 1));
        }
        let before = list.clone();
        let mut after = list.clone();
        after.upsert(node("n10000", 2));
        let chunks = before.chunks.len();
        assert!(chunks > 100, "{chunks} chunks");
        assert_eq!(after.shared_chunks(&before), chunks - 1);
        assert_eq!(
            before
                .get(&Label::parse("n10000").unwrap())
                .unwrap()
                .spec
                .weight,
            1
        );
        assert_eq!(
            after
                .get(&Label::parse("n10000").unwrap())
                .unwrap()
                .spec
                .weight,
            2
        );
    }
}
