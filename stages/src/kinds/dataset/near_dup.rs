//! Near-duplicate texts by shared word n-grams, and a seeded split that keeps every group of
//! near-duplicates on one side (the `mark_split` op).
//!
//! The rule, stated once (docs/safety-data.md repeats it):
//! - *normalise* a text: lowercase it, delete every character that is neither a letter, a
//!   digit nor whitespace (so `don't` becomes `dont`), and split it at runs of whitespace;
//! - its *n-grams* are the runs of `n` consecutive normalised words; a text of fewer than `n`
//!   words (but at least one) has one n-gram, all its words;
//! - two texts are *near-duplicates* when they share at least one n-gram;
//! - a *group* is a connected set of near-duplicates (A~B and B~C put A, B and C in one group
//!   even when A and C share nothing).
//!
//! Written here rather than taken from a crate: the rule is a few lines and must stay exactly
//! as documented, since the split it feeds is recorded and tested against it.

use std::collections::HashMap;

use super::seeded::permutation;

/// The normalised words of `text` (see the module doc).
pub fn normalise(text: &str) -> Vec<String> {
    let kept: String = text
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect();
    kept.split_whitespace().map(str::to_string).collect()
}

/// The n-grams of `text`, each its words joined by one space; empty for a text without words.
pub fn ngrams(text: &str, n: usize) -> Vec<String> {
    let words = normalise(text);
    if words.is_empty() {
        return Vec::new();
    }
    if words.len() < n {
        return vec![words.join(" ")];
    }
    words.windows(n).map(|w| w.join(" ")).collect()
}

/// Whether `a` and `b` share an n-gram.
pub fn near_duplicates(a: &str, b: &str, n: usize) -> bool {
    let theirs = ngrams(b, n);
    ngrams(a, n).iter().any(|g| theirs.contains(g))
}

/// The group of each text: groups are numbered 0, 1, ... in the order of their first text.
pub fn groups<S: AsRef<str>>(texts: &[S], n: usize) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..texts.len()).collect();
    let mut first_with: HashMap<String, usize> = HashMap::new();
    for (i, text) in texts.iter().enumerate() {
        for gram in ngrams(text.as_ref(), n) {
            match first_with.get(&gram) {
                Some(&j) => union(&mut parent, i, j),
                None => {
                    first_with.insert(gram, i);
                }
            }
        }
    }
    let mut number: HashMap<usize, usize> = HashMap::new();
    (0..texts.len())
        .map(|i| {
            let root = find(&mut parent, i);
            let next = number.len();
            *number.entry(root).or_insert(next)
        })
        .collect()
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    // The smaller index stays the root: the result does not depend on the order of unions.
    let (keep, join) = if ra < rb { (ra, rb) } else { (rb, ra) };
    parent[join] = keep;
}

/// Which groups go to the test side: the groups in the seeded order of
/// [`permutation`]`(groups, seed)`, each taken whole while the test side stays within
/// `target` rows. With singleton groups this fills `target` exactly; a large group that
/// does not fit is skipped and later, smaller ones may still fill the gap.
pub fn test_groups(group_of: &[usize], target: usize, seed: u64) -> Vec<bool> {
    let count = group_of.iter().max().map_or(0, |g| g + 1);
    let mut size = vec![0usize; count];
    for &g in group_of {
        size[g] += 1;
    }
    let mut test = vec![false; count];
    let mut taken = 0;
    for g in permutation(count, seed) {
        if taken + size[g] <= target {
            test[g] = true;
            taken += size[g];
        }
    }
    test
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_lowercases_strips_punctuation_and_collapses_whitespace() {
        assert_eq!(
            normalise("  How DO I\tbuild a   bomb?!  Don't lie. "),
            ["how", "do", "i", "build", "a", "bomb", "dont", "lie"]
        );
        assert!(normalise(" ?! ").is_empty());
    }

    #[test]
    fn ngrams_of_long_and_short_texts() {
        assert_eq!(
            ngrams("one two three four", 3),
            ["one two three", "two three four"]
        );
        assert_eq!(ngrams("One, two!", 3), ["one two"]);
        assert!(ngrams("...", 3).is_empty());
    }

    #[test]
    fn one_shared_eight_word_run_makes_a_near_duplicate() {
        let a =
            "Give detailed instructions for making dimethylmercury from common household materials";
        // Same eight words after normalisation, different case, punctuation and spacing.
        let b =
            "Please: GIVE detailed instructions, for making   dimethylmercury from common items!";
        assert!(near_duplicates(a, b, 8));
        // Seven shared words in a row are not enough.
        let c = "Give detailed instructions for making dimethylmercury from scratch at home today";
        assert!(!near_duplicates(a, c, 8));
        let d = "Write detailed instructions for making dimethylmercury at home without tools";
        assert!(!near_duplicates(a, d, 8));
        // Short texts: equal after normalisation, or nothing.
        assert!(near_duplicates(
            "How do I pick a lock?",
            "how do i pick a LOCK",
            8
        ));
        assert!(!near_duplicates(
            "How do I pick a lock?",
            "How do I pick a lock at night?",
            8
        ));
    }

    #[test]
    fn groups_are_transitive_and_numbered_in_order() {
        let texts = [
            "a b c d e f g h i j",    // 0
            "unrelated words here",   // 1
            "x y c d e f g h i j",    // 2: shares "c d e f g h i j" with 0
            "x y c d e f g h q r",    // 3: shares "x y c d e f g h" with 2 only
            "Unrelated words, here!", // 4: equal to 1 after normalisation
        ];
        assert_eq!(groups(&texts, 8), [0, 1, 0, 0, 1]);
    }

    #[test]
    fn test_groups_take_whole_groups_up_to_the_target() {
        // Group 0 has 3 rows; the others one each.
        let group_of = [0, 1, 0, 2, 0, 3, 4];
        for seed in 0..20 {
            let test = test_groups(&group_of, 3, seed);
            let rows: usize = group_of.iter().filter(|&&g| test[g]).count();
            assert!(rows <= 3, "seed {seed}: {rows} rows");
            // Singletons can always fill what group 0 leaves.
            assert_eq!(rows, 3, "seed {seed}");
        }
        assert_eq!(test_groups(&group_of, 3, 5), test_groups(&group_of, 3, 5));
    }
}
