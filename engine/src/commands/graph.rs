//! `emflow graph`: the stage DAG coloured by status, as DOT, Mermaid or JSON.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use emflow_cache::Store;
use serde_json::json;

use crate::kind::Registry;
use crate::pipeline::Pipeline;
use crate::plan::{Planner, StageStatus};

/// Output formats of `emflow graph`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
    Json,
}

/// `emflow graph`: the stage DAG coloured by status.
pub fn graph(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    format: GraphFormat,
) -> anyhow::Result<String> {
    let mut planner = Planner::new(pipeline, registry, store)?;
    let statuses: HashMap<usize, StageStatus> = planner
        .statuses(None, &BTreeSet::new())?
        .into_iter()
        .collect();
    let color = |i: usize| match statuses.get(&i).map(|s| s.state.label()) {
        Some("cached") => "#b7e4b0",
        Some("stale") => "#ffd27f",
        Some("missing") => "#9ecbff",
        _ => "#e0e0e0",
    };
    let label = |i: usize| {
        let s = &pipeline.stages[i];
        format!(
            "{}\\n{} · {}",
            s.id,
            s.kind,
            statuses.get(&i).map(|s| s.state.label()).unwrap_or("?")
        )
    };
    let mut out = String::new();
    match format {
        GraphFormat::Dot => {
            let _ = writeln!(out, "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];", pipeline.name);
            for &i in planner.dag.order() {
                let _ = writeln!(
                    out,
                    "  n{i} [label=\"{}\", fillcolor=\"{}\"];",
                    label(i).replace('"', "\\\""),
                    color(i)
                );
            }
            for (a, b) in planner.dag.edges() {
                let _ = writeln!(out, "  n{a} -> n{b};");
            }
            out.push_str("}\n");
        }
        GraphFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for &i in planner.dag.order() {
                let text = label(i).replace("\\n", "<br/>").replace('"', "#quot;");
                let _ = writeln!(out, "  n{i}[\"{text}\"]");
                let _ = writeln!(out, "  style n{i} fill:{}", color(i));
            }
            for (a, b) in planner.dag.edges() {
                let _ = writeln!(out, "  n{a} --> n{b}");
            }
        }
        GraphFormat::Json => {
            let nodes: Vec<_> = planner
                .dag
                .order()
                .iter()
                .map(|&i| {
                    let s = &pipeline.stages[i];
                    let st = statuses.get(&i);
                    json!({ "id": s.id, "stage": s.stage, "kind": s.kind, "status": st.map(|s| s.state.label()), "key": st.and_then(|s| s.key.clone()) })
                })
                .collect();
            let edges: Vec<_> = planner
                .dag
                .edges()
                .map(|(a, b)| json!({ "from": pipeline.stages[a].id, "to": pipeline.stages[b].id }))
                .collect();
            out = serde_json::to_string_pretty(
                &json!({ "name": pipeline.name, "nodes": nodes, "edges": edges }),
            )?;
            out.push('\n');
        }
    }
    Ok(out)
}
