//! Which ranks range over the sequence that is split across devices.
//!
//! A cascade names query positions and key positions either with one rank (Lightning:
//! `n`, split into block `t` and position `i`) or with two ranks over the same sequence
//! (softmax attention: queries `p`, keys `m`, the keys split into `m1`, `m0`). Splitting
//! the sequence across `P` devices gives each device a contiguous window of both.

use super::SpError;
use einattn_ir::{Cascade, Handle, Rank, TensorKind};

/// One declared rank over the sequence and the leaf ranks it is iterated by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqRank {
    /// The rank as declared (the parent when it is split).
    pub declared: Handle<Rank>,
    /// The rank whose index counts tiles: the split's outer child, or `declared` itself.
    pub outer: Handle<Rank>,
    /// The split's tile child, if split.
    pub inner: Option<Handle<Rank>>,
    /// Tokens per step of `outer` (the tile extent; 1 when not split).
    pub tile: u64,
}

impl SeqRank {
    pub fn of(cascade: &Cascade, rank: Handle<Rank>) -> SeqRank {
        match &cascade.ranks[rank].split {
            Some(split) => SeqRank {
                declared: rank,
                outer: split.outer,
                inner: Some(split.inner),
                tile: cascade.ranks[split.inner].extent.max(1),
            },
            None => SeqRank {
                declared: rank,
                outer: rank,
                inner: None,
                tile: 1,
            },
        }
    }

    /// Whether `rank` is one of the leaves this sequence rank is iterated by.
    pub fn has_leaf(&self, rank: Handle<Rank>) -> bool {
        rank == self.outer || Some(rank) == self.inner || rank == self.declared
    }
}

/// The query and key ranks of the split sequence (the same rank for Lightning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceRanks {
    pub query: SeqRank,
    pub key: SeqRank,
    /// Tokens in the whole sequence.
    pub tokens: u64,
}

impl SequenceRanks {
    /// The ranks named `query` and `key` (declared names; a split's parent, e.g. `n` or `m`).
    pub fn by_names(cascade: &Cascade, query: &str, key: &str) -> Result<SequenceRanks, SpError> {
        let find = |name: &str| {
            let rank = cascade
                .rank_by_name(name)
                .ok_or_else(|| SpError::Sequence(format!("the kernel has no rank `{name}`")))?;
            // A split child names a tile, not the sequence: use its parent.
            Ok::<_, SpError>(cascade.ranks[rank].parent.unwrap_or(rank))
        };
        SequenceRanks::new(cascade, find(query)?, find(key)?)
    }

    pub fn new(
        cascade: &Cascade,
        query: Handle<Rank>,
        key: Handle<Rank>,
    ) -> Result<SequenceRanks, SpError> {
        let q = SeqRank::of(cascade, query);
        let k = SeqRank::of(cascade, key);
        let tokens = cascade.ranks[query].extent;
        if cascade.ranks[key].extent != tokens {
            return Err(SpError::Sequence(format!(
                "query rank `{}` has {} positions but key rank `{}` has {}: they must range over one sequence",
                cascade.ranks[query].name, tokens, cascade.ranks[key].name, cascade.ranks[key].extent
            )));
        }
        Ok(SequenceRanks {
            query: q,
            key: k,
            tokens,
        })
    }

    /// Finds the sequence from the cascade's structure: the query rank is a declared rank
    /// that indexes an output and an input; the key rank has the same extent, indexes an
    /// input, and is reduced or iterated by some Einsum through one of its leaves (for
    /// Lightning it is the query rank itself). Among candidates, a key rank that carries a
    /// recurrence wins over one that is only reduced, then the longest one.
    pub fn detect(cascade: &Cascade) -> Result<SequenceRanks, SpError> {
        let indexes = |rank: Handle<Rank>, kind: TensorKind| {
            cascade
                .tensors
                .iter()
                .any(|(_, t)| t.kind == kind && t.ranks.contains(&rank))
        };
        let declared: Vec<Handle<Rank>> = cascade
            .ranks
            .iter()
            .filter(|(_, r)| r.parent.is_none())
            .map(|(h, _)| h)
            .collect();
        let leaf_role = |rank: Handle<Rank>| -> (bool, bool) {
            let seq = SeqRank::of(cascade, rank);
            let iterated = cascade.einsums.iter().any(|(_, e)| {
                e.recurrence
                    .as_ref()
                    .is_some_and(|rec| seq.has_leaf(rec.rank))
            });
            let reduced = cascade
                .einsums
                .iter()
                .any(|(_, e)| e.reductions.iter().any(|red| seq.has_leaf(red.rank)));
            (iterated, reduced)
        };
        // ((carries a recurrence, extent), query, key)
        type Candidate = ((bool, u64), Handle<Rank>, Handle<Rank>);
        let mut best: Option<Candidate> = None;
        for &q in &declared {
            if !indexes(q, TensorKind::Output) || !indexes(q, TensorKind::Input) {
                continue;
            }
            for &k in &declared {
                let extent = cascade.ranks[k].extent;
                if extent != cascade.ranks[q].extent || !indexes(k, TensorKind::Input) {
                    continue;
                }
                let (iterated, reduced) = leaf_role(k);
                if !iterated && !reduced {
                    continue;
                }
                let score = (iterated, extent);
                if best.as_ref().is_none_or(|(s, _, _)| score > *s) {
                    best = Some((score, q, k));
                }
            }
        }
        match best {
            Some((_, q, k)) => SequenceRanks::new(cascade, q, k),
            None => Err(SpError::Sequence(
                "no rank looks like a sequence (an output rank with a reduced or iterated key rank of the same length); name it with --seq".to_string(),
            )),
        }
    }

    /// Whether queries and keys are one rank (Lightning) rather than two (softmax).
    pub fn single_rank(&self) -> bool {
        self.query.declared == self.key.declared
    }

    /// The finest token granularity a device boundary may fall on: both tiles divide it.
    pub fn granule(&self) -> u64 {
        lcm(self.query.tile, self.key.tile)
    }

    /// Whether `rank` is a leaf of the query or key rank (or one of them as declared).
    pub fn is_sequence_leaf(&self, rank: Handle<Rank>) -> bool {
        self.query.has_leaf(rank) || self.key.has_leaf(rank)
    }

    pub fn describe(&self, cascade: &Cascade) -> String {
        let name = |r: Handle<Rank>| cascade.ranks[r].name.clone();
        if self.single_rank() {
            format!("`{}` ({} tokens)", name(self.query.declared), self.tokens)
        } else {
            format!(
                "queries `{}`, keys `{}` ({} tokens)",
                name(self.query.declared),
                name(self.key.declared),
                self.tokens
            )
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(crate) fn lcm(a: u64, b: u64) -> u64 {
    if a == 0 || b == 0 {
        a.max(b)
    } else {
        a / gcd(a, b) * b
    }
}
