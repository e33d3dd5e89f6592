//! The token trie of a prompt's candidate continuations, laid out for tree attention.
//!
//! Candidates such as the judge's "7", "72", "72<end>" share prefixes. Scoring each as its own
//! sequence re-runs the shared tokens and copies the prompt's KV cache once per candidate.
//! Here every distinct proper prefix becomes one node, holding the token that ends it; the
//! nodes go after the cached prompt in one sequence, and the attention mask lets each node see
//! only the prompt, its ancestors and itself, so every node's hidden state is the one it would
//! have in its own sequence. A candidate's log-probability is then a sum over its edges
//! (context, next token), each read once from its context's output distribution.

use std::collections::HashMap;
use std::ops::Range;

/// Context 0 is the prompt alone; context `i + 1` is the prompt followed by node `i`'s prefix.
pub(crate) type Context = usize;

pub(crate) struct CandidateTree {
    /// The last token of each node's prefix; parents come before their children.
    pub(crate) tokens: Vec<u32>,
    parents: Vec<Option<usize>>,
    /// Prefix length of each node (1 for a first token).
    depths: Vec<usize>,
    /// Distinct (context, next token) pairs whose log-probability some candidate needs.
    pub(crate) edges: Vec<(Context, u32)>,
    /// For each candidate, the indices into `edges` of its tokens, in order.
    pub(crate) paths: Vec<Vec<usize>>,
}

impl CandidateTree {
    pub(crate) fn build(candidates: &[Vec<u32>]) -> Self {
        let mut tree = CandidateTree {
            tokens: Vec::new(),
            parents: Vec::new(),
            depths: Vec::new(),
            edges: Vec::new(),
            paths: Vec::with_capacity(candidates.len()),
        };
        let mut children: HashMap<(Context, u32), usize> = HashMap::new();
        let mut edge_index: HashMap<(Context, u32), usize> = HashMap::new();
        for cand in candidates {
            let mut context: Context = 0;
            let mut path = Vec::with_capacity(cand.len());
            for (j, &token) in cand.iter().enumerate() {
                let edge = *edge_index.entry((context, token)).or_insert_with(|| {
                    tree.edges.push((context, token));
                    tree.edges.len() - 1
                });
                path.push(edge);
                if j + 1 < cand.len() {
                    // The prefix up to this token is the context of the next one: a node.
                    let node = *children.entry((context, token)).or_insert_with(|| {
                        tree.tokens.push(token);
                        tree.parents.push(context.checked_sub(1));
                        tree.depths.push(j + 1);
                        tree.tokens.len() - 1
                    });
                    context = node + 1;
                }
            }
            tree.paths.push(path);
        }
        tree
    }

    /// Number of nodes (tokens to run after the prompt).
    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Position ids and the additive mask (nodes.len(), prompt_len + nodes.end) for the nodes
    /// in `nodes`, run after the prompt and all earlier nodes are in the cache: node `i` sits
    /// in slot `prompt_len + i` and sees the prompt, its ancestors and itself.
    pub(crate) fn layout(&self, prompt_len: usize, nodes: Range<usize>) -> (Vec<u32>, Vec<f32>) {
        let kv = prompt_len + nodes.end;
        let mut positions = Vec::with_capacity(nodes.len());
        let mut mask = vec![f32::NEG_INFINITY; nodes.len() * kv];
        for (row, node) in nodes.enumerate() {
            positions.push((prompt_len + self.depths[node] - 1) as u32);
            let visible = &mut mask[row * kv..(row + 1) * kv];
            visible[..prompt_len].fill(0.0);
            let mut at = Some(node);
            while let Some(n) = at {
                visible[prompt_len + n] = 0.0;
                at = self.parents[n];
            }
        }
        (positions, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_become_one_node_and_one_edge() {
        let cands = vec![vec![5, 6, 9], vec![5, 9], vec![5, 6, 9], vec![7], vec![]];
        let tree = CandidateTree::build(&cands);
        // Nodes: "5", "5 6". "7" and the final tokens are only read, never run.
        assert_eq!(tree.tokens, vec![5, 6]);
        assert_eq!(tree.parents, vec![None, Some(0)]);
        assert_eq!(tree.depths, vec![1, 2]);
        assert_eq!(tree.edges, vec![(0, 5), (1, 6), (2, 9), (1, 9), (0, 7)]);
        assert_eq!(
            tree.paths,
            vec![vec![0, 1, 2], vec![0, 3], vec![0, 1, 2], vec![4], vec![]]
        );
    }

    #[test]
    fn layout_shows_each_node_the_prompt_and_its_ancestors() {
        // Nodes: 0 = "1", 1 = "1 3", 2 = "1 3 5", 3 = "2", 4 = "2 4".
        let cands = vec![vec![1, 3, 5, 0], vec![2, 4, 0]];
        let tree = CandidateTree::build(&cands);
        assert_eq!(tree.tokens, vec![1, 3, 5, 2, 4]);
        let inf = f32::NEG_INFINITY;
        let (pos, mask) = tree.layout(2, 0..5);
        assert_eq!(pos, vec![2, 3, 4, 2, 3]);
        #[rustfmt::skip]
        let want = vec![
            0.0, 0.0, 0.0, inf, inf, inf, inf,
            0.0, 0.0, 0.0, 0.0, inf, inf, inf,
            0.0, 0.0, 0.0, 0.0, 0.0, inf, inf,
            0.0, 0.0, inf, inf, inf, 0.0, inf,
            0.0, 0.0, inf, inf, inf, 0.0, 0.0,
        ];
        assert_eq!(mask, want);
        // A later chunk sees ancestors already in the cache.
        let (pos, mask) = tree.layout(2, 4..5);
        assert_eq!(pos, vec![3]);
        assert_eq!(mask, vec![0.0, 0.0, inf, inf, inf, 0.0, 0.0]);
    }
}
