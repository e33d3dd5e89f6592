//! The stage graph of an expanded [`Pipeline`]: one node per stage instance, one edge per
//! upstream instance feeding it (however many ports it feeds).
//!
//! The graph is built once per command and gives the planner a deterministic topological
//! order (manifest order among independent stages, so output is stable across runs) and
//! the upstream/downstream sets that `--only`, `status` and `graph` need. A cycle is a
//! manifest mistake, reported as a located diagnostic that prints the whole cycle.

use std::collections::{BTreeSet, HashMap};

use miette::{Diagnostic, LabeledSpan, NamedSource};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::pipeline::{InputRef, Pipeline};

/// Instance indices (into `Pipeline::stages`) and the edges between them.
pub struct Dag {
    graph: DiGraph<usize, ()>,
    /// Topological order, ties broken by manifest order.
    order: Vec<usize>,
    index_of: HashMap<String, usize>,
}

/// A dependency cycle among stages, pointing at every stage on it.
#[derive(Debug, thiserror::Error)]
#[error("the stages form a cycle: {}", cycle.join(" -> "))]
pub struct CycleError {
    /// Instance ids along the cycle, the first repeated at the end.
    pub cycle: Vec<String>,
    src: NamedSource<String>,
    labels: Vec<LabeledSpan>,
}

impl Diagnostic for CycleError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new("emflow::cycle"))
    }
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new("a stage cannot consume its own output, directly or through other stages; remove one of these input references"))
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.src)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }
}

/// Why a DAG could not be built.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum DagError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Cycle(Box<CycleError>),
    #[error(
        "stage `{stage}` reads `{reference}.{output}`, but no stage instance `{reference}` exists"
    )]
    #[diagnostic(help(
        "this is a bug in manifest expansion if the manifest validated; please report it"
    ))]
    UnknownStage {
        stage: String,
        reference: String,
        output: String,
    },
}

impl Dag {
    pub fn build(pipeline: &Pipeline) -> Result<Dag, DagError> {
        let mut graph = DiGraph::with_capacity(pipeline.stages.len(), pipeline.stages.len());
        let mut index_of = HashMap::with_capacity(pipeline.stages.len());
        for (i, stage) in pipeline.stages.iter().enumerate() {
            graph.add_node(i);
            index_of.insert(stage.id.clone(), i);
        }
        for (i, stage) in pipeline.stages.iter().enumerate() {
            let mut upstream = BTreeSet::new();
            for refs in stage.inputs.values() {
                for r in refs {
                    if let InputRef::Stage { stage: up, output } = r {
                        let Some(&j) = index_of.get(up) else {
                            return Err(DagError::UnknownStage {
                                stage: stage.id.clone(),
                                reference: up.clone(),
                                output: output.clone(),
                            });
                        };
                        upstream.insert(j);
                    }
                }
            }
            for j in upstream {
                graph.add_edge(NodeIndex::new(j), NodeIndex::new(i), ());
            }
        }
        let order = stable_topo_order(&graph)
            .map_err(|cycle| DagError::Cycle(Box::new(cycle_error(pipeline, &cycle))))?;
        Ok(Dag {
            graph,
            order,
            index_of,
        })
    }

    /// Every instance index, upstream before downstream; manifest order among independents.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index_of.get(id).copied()
    }

    /// Direct upstream instances of `i`.
    pub fn upstream(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.graph
            .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
            .map(|n| n.index())
    }

    /// Direct downstream instances of `i`.
    pub fn downstream(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.graph
            .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
            .map(|n| n.index())
    }

    /// `roots` and everything they (transitively) read from.
    pub fn upstream_closure(&self, roots: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
        self.closure(roots, Direction::Incoming)
    }

    /// `roots` and everything that (transitively) reads from them.
    pub fn downstream_closure(&self, roots: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
        self.closure(roots, Direction::Outgoing)
    }

    fn closure(&self, roots: impl IntoIterator<Item = usize>, dir: Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<usize> = roots.into_iter().collect();
        while let Some(i) = todo.pop() {
            if seen.insert(i) {
                todo.extend(
                    self.graph
                        .neighbors_directed(NodeIndex::new(i), dir)
                        .map(|n| n.index()),
                );
            }
        }
        seen
    }

    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    /// (upstream, downstream) pairs.
    pub fn edges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.graph
            .edge_indices()
            .filter_map(|e| self.graph.edge_endpoints(e))
            .map(|(a, b)| (a.index(), b.index()))
    }
}

/// Kahn's algorithm with a min-heap on the node index, so independent stages keep
/// manifest order. On a cycle, returns the node indices of one cycle.
fn stable_topo_order(graph: &DiGraph<usize, ()>) -> Result<Vec<usize>, Vec<usize>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = graph.node_count();
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| {
            graph
                .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for next in graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            let d = &mut indegree[next.index()];
            *d -= 1;
            if *d == 0 {
                ready.push(Reverse(next.index()));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every node left has an unprocessed predecessor that is also left: walking
    // predecessors from any of them must revisit a node, which closes a cycle.
    let left: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] > 0).collect();
    let mut path = Vec::new();
    let mut pos = HashMap::new();
    let mut at = *left.iter().next().unwrap_or(&0);
    loop {
        if let Some(&start) = pos.get(&at) {
            let mut cycle: Vec<usize> = path[start..].to_vec();
            cycle.reverse(); // predecessors were walked: flip to data-flow order
            let first = cycle[0];
            cycle.push(first);
            return Err(cycle);
        }
        pos.insert(at, path.len());
        path.push(at);
        at = graph
            .neighbors_directed(NodeIndex::new(at), Direction::Incoming)
            .map(|p| p.index())
            .find(|p| left.contains(p))
            .unwrap_or(at);
    }
}

fn cycle_error(pipeline: &Pipeline, cycle: &[usize]) -> CycleError {
    let ids: Vec<String> = cycle
        .iter()
        .map(|&i| pipeline.stages[i].id.clone())
        .collect();
    let text = std::fs::read_to_string(&pipeline.manifest_path).unwrap_or_default();
    let mut labels = Vec::new();
    let mut seen = BTreeSet::new();
    for (step, &i) in cycle.iter().enumerate().take(cycle.len().saturating_sub(1)) {
        let stage = &pipeline.stages[i];
        let next = &pipeline.stages[cycle[step + 1]];
        let span = stage.span;
        if seen.insert(span.offset) && span.offset + span.len <= text.len() {
            labels.push(LabeledSpan::at(
                span.offset..span.offset + span.len,
                format!("`{}` feeds `{}`", stage.stage, next.stage),
            ));
        }
    }
    CycleError {
        cycle: ids,
        src: NamedSource::new(pipeline.manifest_path.display().to_string(), text),
        labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Resources, SourceSpan, StageInstance};
    use std::collections::BTreeMap;

    pub(crate) fn instance(id: &str, upstream: &[&str]) -> StageInstance {
        let refs = upstream
            .iter()
            .map(|u| InputRef::Stage {
                stage: u.to_string(),
                output: "out".into(),
            })
            .collect();
        StageInstance {
            id: id.into(),
            stage: id.into(),
            matrix: Vec::new(),
            kind: "toy".into(),
            params: Default::default(),
            inputs: if upstream.is_empty() {
                BTreeMap::new()
            } else {
                BTreeMap::from([("in".to_string(), refs)])
            },
            outputs: BTreeMap::new(),
            resources: Resources::default(),
            span: SourceSpan::default(),
        }
    }

    fn pipeline(stages: Vec<StageInstance>) -> Pipeline {
        Pipeline {
            name: "t".into(),
            manifest_path: "/nonexistent/emflow.yaml".into(),
            manifest_dir: "/nonexistent".into(),
            profile: None,
            models: BTreeMap::new(),
            stages,
        }
    }

    #[test]
    fn order_is_topological_and_stable() {
        let p = pipeline(vec![
            instance("c", &["b"]),
            instance("a", &[]),
            instance("b", &["a"]),
            instance("d", &[]),
        ]);
        let dag = Dag::build(&p).unwrap();
        let ids: Vec<&str> = dag
            .order()
            .iter()
            .map(|&i| p.stages[i].id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(dag.upstream_closure([0]).len(), 3);
        assert_eq!(dag.downstream_closure([1]).len(), 3);
    }

    #[test]
    fn cycle_is_reported_in_data_flow_order() {
        let p = pipeline(vec![
            instance("a", &["c"]),
            instance("b", &["a"]),
            instance("c", &["b"]),
            instance("x", &[]),
        ]);
        let Err(DagError::Cycle(err)) = Dag::build(&p) else {
            panic!("expected a cycle")
        };
        assert_eq!(err.cycle.len(), 4);
        assert_eq!(err.cycle.first(), err.cycle.last());
        let text = err.to_string();
        assert!(
            text.contains("a -> b -> c -> a")
                || text.contains("b -> c -> a -> b")
                || text.contains("c -> a -> b -> c"),
            "{text}"
        );
    }
}
