//! From raw stages to [`StageInstance`]s: matrix cells, substitution, validation against the
//! kind, wiring (with matrix joins and fan-in), and merging of identical cells.
//!
//! Work happens in three passes so that nothing is quadratic in the number of stages:
//! 1. each stage on its own: kind, matrix, per-cell params/inputs/resources (no upstream needed);
//! 2. the stage-level dependency order (an index by name; a cycle is reported with its path);
//! 3. in that order, each cell's references are matched against the upstream stage's cells
//!    through a hash index on the joined axes, then identical cells are merged.
//!
//! Merging happens per stage and in dependency order, so cells made identical by a merge
//! upstream merge too. A merged instance's id keeps only the axes its cells agree on
//! (`data[domain=legal]` when `seed` made no difference), falling back to the first cell's full
//! id if that would collide with another instance of the stage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::diagnostics::{did_you_mean, list_names, Problem};
use crate::expand::inputs::{read_inputs, InputSpec, PortWiring};
use crate::expand::matrix::{self, instance_id, value_key};
use crate::expand::params::{ResolvedParams, StageScope};
use crate::expand::refs::substitute;
use crate::expand::resources;
use crate::expand::validate::{check_params, report_kind_errors, ParamsSite};
use crate::kind::{ArtifactType, InputFiles, KindSpec, Params, PortSpec, Registry, StageKind};
use crate::manifest::raw::{Located, RawStage};
use crate::manifest::yaml::Node;
use crate::pipeline::{InputRef, ModelDecl, Resources, SourceSpan, StageInstance};

/// One matrix cell (or the single cell of a plain stage) before wiring.
struct Cell {
    coords: matrix::Coords,
    params: Params,
    wiring: Vec<PortWiring>,
    resources: Resources,
    outputs: BTreeMap<String, ArtifactType>,
}

/// A stage after pass 1.
struct StagePlan {
    name: String,
    name_span: SourceSpan,
    kind: String,
    spec: KindSpec,
    axes: Vec<String>,
    cells: Vec<Cell>,
    /// Upstream stage names, first reference's location, in order of first use.
    deps: Vec<(String, SourceSpan)>,
    /// Filled by pass 3: the instances, and for each cell the index of its instance.
    instances: Vec<StageInstance>,
    cell_instance: Vec<usize>,
}

/// Everything stage expansion needs from the rest of the manifest.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub params: &'a ResolvedParams,
    pub models: &'a BTreeMap<String, ModelDecl>,
    pub manifest_dir: &'a Path,
    /// Every stage name, to report a reference to a missing stage even when the referring
    /// stage has other problems.
    pub stage_names: &'a [&'a str],
    /// The same names, for lookups.
    pub stage_set: &'a HashSet<&'a str>,
}

/// Expands all stages; instances come out in manifest order, cells in expansion order.
pub fn expand_stages(
    ctx: &Context<'_>,
    raw: &[RawStage],
    problems: &mut Vec<Problem>,
) -> Vec<StageInstance> {
    let mut plans: Vec<Option<StagePlan>> =
        raw.iter().map(|s| plan_stage(ctx, s, problems)).collect();
    let index: HashMap<&str, usize> = raw
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let Some(order) = dependency_order(raw, &plans, &index, problems) else {
        return Vec::new();
    };
    let mut joins = JoinIndex::default();
    for i in order {
        let Some(mut plan) = plans[i].take() else {
            continue;
        };
        let ok = wire_stage(ctx, &mut plan, &plans, &index, &mut joins, problems);
        if ok {
            merge_cells(&mut plan);
            plans[i] = Some(plan);
        }
    }
    plans
        .into_iter()
        .flatten()
        .flat_map(|p| p.instances)
        .collect()
}

/// One stage's plan: its kind, its matrix cells, each cell's checked params, wiring and
/// resources, and the stages it reads from. `None` when anything about it is wrong (the
/// problems say what).
fn plan_stage(ctx: &Context<'_>, raw: &RawStage, problems: &mut Vec<Problem>) -> Option<StagePlan> {
    let kind_name = raw.kind.as_ref()?;
    let Some(kind) = ctx.registry.kind(&kind_name.value) else {
        problems.push(unknown_kind(ctx, raw, kind_name));
        return None;
    };
    let spec = kind.spec();
    let before = problems.len();
    let (axes, cells_coords) = match raw.matrix() {
        None => (Vec::new(), vec![matrix::Coords::new()]),
        Some(m) => {
            let mut scope = StageScope {
                params: ctx.params,
                matrix: None,
                stage: &raw.name,
            };
            let m = substitute(m, &mut scope, problems)?;
            let m = matrix::expand(&raw.name, &m, problems)?;
            (m.axes, m.cells)
        }
    };
    let mut cells = Vec::with_capacity(cells_coords.len());
    let mut deps = Deps::default();
    for coords in cells_coords {
        let matrix = (!axes.is_empty()).then_some(&coords);
        let site = CellSite {
            ctx,
            raw,
            kind: kind.as_ref(),
            spec: &spec,
            matrix,
        };
        if let Some((params, wiring, resources)) = site.plan(&mut deps, problems) {
            let outputs = (kind.outputs(&params).into_iter())
                .map(|p| (p.name, p.ty))
                .collect();
            cells.push(Cell {
                coords,
                params,
                wiring,
                resources,
                outputs,
            });
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(StagePlan {
        name: raw.name.clone(),
        name_span: raw.name_span,
        kind: kind_name.value.clone(),
        spec,
        axes,
        cells,
        deps: deps.list,
        instances: Vec::new(),
        cell_instance: Vec::new(),
    })
}

fn unknown_kind(ctx: &Context<'_>, raw: &RawStage, kind_name: &Located<String>) -> Problem {
    let known: Vec<&str> = ctx.registry.kind_names().collect();
    let mut help = format!("known kinds: {}", list_names(known.iter().copied()));
    if let Some(d) = did_you_mean(&kind_name.value, known.iter().copied()) {
        help = format!("{d}\n{help}");
    }
    Problem::new(format!(
        "stage `{}`: unknown stage kind `{}`",
        raw.name, kind_name.value
    ))
    .at(kind_name.span, "unknown kind")
    .help(help)
}

/// The stages a stage reads from, each once, in the order first referenced.
#[derive(Default)]
struct Deps {
    list: Vec<(String, SourceSpan)>,
    seen: HashSet<String>,
}

/// One matrix cell of a stage being planned.
struct CellSite<'a, 'c> {
    ctx: &'a Context<'c>,
    raw: &'a RawStage,
    kind: &'a dyn StageKind,
    spec: &'a KindSpec,
    /// The cell's coordinates, for a matrix stage.
    matrix: Option<&'a matrix::Coords>,
}

impl CellSite<'_, '_> {
    /// The cell's params, wiring and resources with references substituted and checked
    /// against the kind; references to stages are added to `deps`.
    fn plan(
        &self,
        deps: &mut Deps,
        problems: &mut Vec<Problem>,
    ) -> Option<(Params, Vec<PortWiring>, Resources)> {
        let raw = self.raw;
        // All three are substituted before giving up, so one pass reports every problem.
        let params_node = self.substituted(raw.params(), problems);
        let inputs_node = self.substituted(raw.inputs(), problems);
        let resources_node = self.substituted(raw.resources(), problems);
        let (params_node, inputs_node, resources_node) =
            (params_node?, inputs_node?, resources_node?);
        let site = ParamsSite {
            stage: &raw.name,
            missing_at: raw.params_key.unwrap_or(raw.name_span),
        };
        let params = check_params(&site, self.spec, self.kind, params_node.as_ref(), problems);
        let missing_inputs_at = raw.inputs_key.unwrap_or(raw.name_span);
        let node = inputs_node.as_ref();
        let wiring = read_inputs(&raw.name, self.spec, node, missing_inputs_at, problems);
        let res = match &resources_node {
            Some(n) => resources::parse(n, problems),
            None => Some(Resources::default()),
        };
        let (Some(params), Some(wiring), Some(resources)) = (params, wiring, res) else {
            return None;
        };
        self.check_refs(&wiring, deps, problems);
        if let Some(files) = input_files(&wiring, self.ctx.manifest_dir) {
            if let Err(errors) = self.kind.check_files(&params, &files) {
                report_kind_errors(&site, params_node.as_ref(), errors, problems);
                return None;
            }
        }
        Some((params, wiring, resources))
    }

    /// `node` with `${...}` substituted in this cell's scope: `Some(None)` for an absent
    /// node, `None` when substitution failed.
    fn substituted(
        &self,
        node: Option<&Node>,
        problems: &mut Vec<Problem>,
    ) -> Option<Option<Node>> {
        let Some(node) = node else {
            return Some(None);
        };
        let mut scope = StageScope {
            params: self.ctx.params,
            matrix: self.matrix,
            stage: &self.raw.name,
        };
        substitute(node, &mut scope, problems).map(Some)
    }

    /// Every stage or model an input names must exist; stages go into `deps`.
    fn check_refs(&self, wiring: &[PortWiring], deps: &mut Deps, problems: &mut Vec<Problem>) {
        let (ctx, stage_name) = (self.ctx, &self.raw.name);
        for (r, span) in wiring.iter().flat_map(|w| &w.refs) {
            match r {
                InputSpec::Stage { stage, .. } => {
                    if !ctx.stage_set.contains(stage.as_str()) {
                        let names = ctx.stage_names.iter().copied();
                        let listed = || {
                            format!(
                                "stages in this manifest: {}",
                                list_names(names.clone().take(30))
                            )
                        };
                        let message =
                            format!("stage `{stage_name}`: reference to unknown stage `{stage}`");
                        problems.push(Problem::new(message).at(*span, "no such stage").suggest(
                            stage,
                            names.clone(),
                            listed,
                        ));
                    } else if deps.seen.insert(stage.clone()) {
                        deps.list.push((stage.clone(), *span));
                    }
                }
                InputSpec::Model { name } if !ctx.models.contains_key(name) => {
                    let models = || ctx.models.keys().map(String::as_str);
                    let listed = || format!("models in this manifest: {}", list_names(models()));
                    let message =
                        format!("stage `{stage_name}`: reference to unknown model `{name}`");
                    problems.push(Problem::new(message).at(*span, "no such model").suggest(
                        name,
                        models(),
                        listed,
                    ));
                }
                _ => {}
            }
        }
    }
}

/// A `file:` input's path: absolute, or relative to the manifest's folder.
fn file_path(path: &str, manifest_dir: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        manifest_dir.join(p)
    }
}

/// A cell's wired ports with their `file:` paths, for [`crate::kind::StageKind::check_files`];
/// `None` when the cell has no `file:` input.
fn input_files(wiring: &[PortWiring], manifest_dir: &Path) -> Option<InputFiles> {
    let any_file = wiring
        .iter()
        .flat_map(|w| &w.refs)
        .any(|(r, _)| matches!(r, InputSpec::File { .. }));
    any_file.then(|| {
        wiring
            .iter()
            .map(|w| {
                let refs = w
                    .refs
                    .iter()
                    .map(|(r, _)| match r {
                        InputSpec::File { path } => Some(file_path(path, manifest_dir)),
                        _ => None,
                    })
                    .collect();
                (w.port.clone(), refs)
            })
            .collect()
    })
}

/// Stage indices in an order where every stage comes after its upstream stages (manifest
/// order where free). A cycle is reported with its path; `None` when there is one.
fn dependency_order(
    raw: &[RawStage],
    plans: &[Option<StagePlan>],
    index: &HashMap<&str, usize>,
    problems: &mut Vec<Problem>,
) -> Option<Vec<usize>> {
    let mut edges: Vec<Vec<(usize, SourceSpan)>> = vec![Vec::new(); raw.len()];
    for (i, plan) in plans.iter().enumerate() {
        let Some(plan) = plan else { continue };
        edges[i] = plan
            .deps
            .iter()
            .filter_map(|(dep, span)| index.get(dep.as_str()).map(|&j| (j, *span)))
            .collect();
    }
    // Iterative depth-first search: 0 = new, 1 = on the stack, 2 = done.
    let mut state = vec![0u8; raw.len()];
    let mut order = Vec::with_capacity(raw.len());
    let mut cycle_found = false;
    for root in 0..raw.len() {
        if state[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&(dep, span)) = edges[node].get(*next) {
                *next += 1;
                match state[dep] {
                    0 => {
                        state[dep] = 1;
                        stack.push((dep, 0));
                    }
                    1 => {
                        cycle_found = true;
                        problems.push(cycle_problem(raw, &stack, dep, span, &edges));
                    }
                    _ => {}
                }
            } else {
                state[node] = 2;
                order.push(node);
                stack.pop();
            }
        }
    }
    (!cycle_found).then_some(order)
}

fn cycle_problem(
    raw: &[RawStage],
    stack: &[(usize, usize)],
    back_to: usize,
    closing: SourceSpan,
    edges: &[Vec<(usize, SourceSpan)>],
) -> Problem {
    let start = stack.iter().position(|(n, _)| *n == back_to).unwrap_or(0);
    let members: Vec<usize> = stack[start..].iter().map(|(n, _)| *n).collect();
    // The stack runs downstream -> upstream; show the data flow upstream -> downstream.
    let mut path: Vec<&str> = members
        .iter()
        .rev()
        .map(|&n| raw[n].name.as_str())
        .collect();
    path.push(raw[members[members.len() - 1]].name.as_str());
    let mut p = Problem::new(format!(
        "stages depend on each other in a cycle: {}",
        path.join(" -> ")
    ))
    .at(
        closing,
        format!(
            "`{}` reads from `{}`",
            raw[members[members.len() - 1]].name,
            raw[back_to].name
        ),
    );
    for w in members.windows(2) {
        if let Some((_, span)) = edges[w[0]].iter().find(|(d, _)| *d == w[1]) {
            p = p.at(
                *span,
                format!("`{}` reads from `{}`", raw[w[0]].name, raw[w[1]].name),
            );
        }
    }
    p.help("a stage cannot consume its own output, directly or through others; remove one of these inputs")
}

/// For each (upstream stage, joined axes): cell key -> upstream cells with those values.
#[derive(Default)]
struct JoinIndex {
    maps: HashMap<(usize, Vec<String>), HashMap<String, Vec<usize>>>,
}

fn join_key<'a>(values: impl Iterator<Item = &'a Node>) -> String {
    let mut key = String::new();
    for v in values {
        key.push_str(&value_key(v));
        key.push('\u{1f}');
    }
    key
}

impl JoinIndex {
    fn lookup(
        &mut self,
        upstream_idx: usize,
        upstream: &StagePlan,
        axes: &[String],
        key: &str,
    ) -> &[usize] {
        let map = self
            .maps
            .entry((upstream_idx, axes.to_vec()))
            .or_insert_with(|| {
                let mut m: HashMap<String, Vec<usize>> = HashMap::new();
                for (i, cell) in upstream.cells.iter().enumerate() {
                    let k = join_key(axes.iter().filter_map(|a| cell.coords.get(a)));
                    m.entry(k).or_default().push(i);
                }
                m
            });
        map.get(key).map_or(&[], Vec::as_slice)
    }
}

/// One reference from a stage's input port to an upstream stage's output.
struct Link<'a> {
    plan: &'a StagePlan,
    port: &'a PortSpec,
    up: &'a StagePlan,
    output: &'a str,
    span: SourceSpan,
}

impl Link<'_> {
    /// Adds the output of each matched upstream cell to `refs`; stops at the first cell
    /// without that output or with an output the port does not accept.
    fn refs(&self, matched: Vec<usize>, refs: &mut Vec<InputRef>, problems: &mut Vec<Problem>) {
        let (plan, up, output) = (self.plan, self.up, self.output);
        for m in matched {
            let inst = &up.instances[up.cell_instance[m]];
            match inst.outputs.get(output) {
                None => {
                    let names = inst.outputs.keys().map(String::as_str);
                    let listed = || {
                        let outputs = list_names(names.clone());
                        format!("`{}` (kind `{}`) has outputs {outputs}", up.name, up.kind)
                    };
                    let message = format!(
                        "stage `{}`: stage `{}` has no output `{output}`",
                        plan.name, up.name
                    );
                    problems.push(
                        Problem::new(message)
                            .at(self.span, "no such output")
                            .suggest(output, names.clone(), listed),
                    );
                    break;
                }
                Some(&ty) if !self.port.ty.accepts(ty) => {
                    problems.push(type_mismatch(
                        &plan.name,
                        self.port,
                        &format!("{}.{output}", up.name),
                        ty,
                        self.span,
                    ));
                    break;
                }
                Some(_) => refs.push(InputRef::Stage {
                    stage: inst.id.clone(),
                    output: output.to_string(),
                }),
            }
        }
    }
}

fn wire_stage(
    ctx: &Context<'_>,
    plan: &mut StagePlan,
    plans: &[Option<StagePlan>],
    index: &HashMap<&str, usize>,
    joins: &mut JoinIndex,
    problems: &mut Vec<Problem>,
) -> bool {
    let before = problems.len();
    let mut upstream_broken = false;
    let mut instances = Vec::with_capacity(plan.cells.len());
    // A cell's params, wiring and outputs move into its instance: downstream stages read
    // only the cells' coordinates (and the instances), and at 100,000 cells the copies
    // were a third of a dry run's peak memory (issue 22).
    let mut cells = std::mem::take(&mut plan.cells);
    for cell in &mut cells {
        let id = instance_id(&plan.name, &cell.coords);
        let mut inputs: BTreeMap<String, Vec<InputRef>> = BTreeMap::new();
        for w in std::mem::take(&mut cell.wiring) {
            let Some(port) = plan.spec.inputs.iter().find(|p| p.name == w.port) else {
                continue;
            };
            let mut refs: Vec<InputRef> = Vec::new();
            for (spec, span) in &w.refs {
                match spec {
                    InputSpec::File { path } => {
                        refs.push(InputRef::File {
                            path: file_path(path, ctx.manifest_dir),
                        });
                    }
                    InputSpec::Model { name } => {
                        if !port.ty.accepts(ArtifactType::Model) {
                            problems.push(type_mismatch(
                                &plan.name,
                                port,
                                &format!("models.{name}"),
                                ArtifactType::Model,
                                *span,
                            ));
                        }
                        refs.push(InputRef::Model { name: name.clone() });
                    }
                    InputSpec::Stage {
                        stage,
                        select,
                        output,
                    } => {
                        let Some(&u) = index.get(stage.as_str()) else {
                            continue;
                        };
                        let Some(up) = plans[u].as_ref() else {
                            upstream_broken = true;
                            continue;
                        };
                        let matched =
                            match_cells(plan, cell, &id, u, up, select, *span, joins, problems);
                        let link = Link {
                            plan,
                            port,
                            up,
                            output,
                            span: *span,
                        };
                        link.refs(matched, &mut refs, problems);
                    }
                }
            }
            // Merged upstream cells can make a fan-in name one artifact twice; feed it once.
            let mut seen = HashSet::new();
            refs.retain(|r| seen.insert(r.clone()));
            if !port.many && refs.len() > 1 {
                let span = w.refs.first().map_or(plan.name_span, |r| r.1);
                problems.push(
                    Problem::new(format!(
                        "stage `{id}`: input port `{}` takes one artifact, but its reference matches {} matrix cells",
                        port.name,
                        refs.len()
                    ))
                    .at(span, format!("fans in {} cells", refs.len()))
                    .help(
                        "the upstream stage has matrix axes this stage lacks; select one cell (`stage[axis=value].output`), add the axes to this stage's matrix, or wire a many-port",
                    ),
                );
            }
            inputs.insert(w.port.clone(), refs);
        }
        instances.push(StageInstance {
            id,
            stage: plan.name.clone(),
            matrix: cell
                .coords
                .iter()
                .filter_map(|(k, v)| v.to_json().ok().map(|j| (k.clone(), j)))
                .collect(),
            kind: plan.kind.clone(),
            params: std::mem::take(&mut cell.params),
            inputs,
            outputs: std::mem::take(&mut cell.outputs),
            resources: cell.resources.clone(),
            span: plan.name_span,
        });
    }
    plan.cells = cells;
    plan.instances = instances;
    problems.len() == before && !upstream_broken
}

fn type_mismatch(
    stage: &str,
    port: &PortSpec,
    what: &str,
    produced: ArtifactType,
    span: SourceSpan,
) -> Problem {
    Problem::new(format!(
        "stage `{stage}`: input port `{}` expects {} artifacts, but `{what}` is {}",
        port.name,
        port.ty.name(),
        produced.name()
    ))
    .at(
        span,
        format!("{} here, {} expected", produced.name(), port.ty.name()),
    )
    .help(format!(
        "wire an output of type {} to `{}`",
        port.ty.name(),
        port.name
    ))
}

/// The upstream cells a reference from `cell` selects: shared axes join, explicit selections
/// filter, the upstream's other axes fan in.
#[allow(clippy::too_many_arguments)]
fn match_cells(
    plan: &StagePlan,
    cell: &Cell,
    id: &str,
    u: usize,
    up: &StagePlan,
    select: &[(String, Node)],
    span: SourceSpan,
    joins: &mut JoinIndex,
    problems: &mut Vec<Problem>,
) -> Vec<usize> {
    if up.axes.is_empty() {
        if !select.is_empty() {
            problems.push(
                Problem::new(format!(
                    "stage `{}`: `{}` has no matrix, so a cell cannot be selected",
                    plan.name, up.name
                ))
                .at(span, "cell selection on a plain stage")
                .help(format!("write `{}.<output>`", up.name)),
            );
            return Vec::new();
        }
        return (0..up.cells.len()).collect();
    }
    for (axis, _) in select {
        if !up.axes.contains(axis) {
            let axes = || up.axes.iter().map(String::as_str);
            let listed = || format!("`{}` has axes {}", up.name, list_names(axes()));
            let message = format!(
                "stage `{}`: `{}` has no matrix axis `{axis}`",
                plan.name, up.name
            );
            problems.push(Problem::new(message).at(span, "unknown axis").suggest(
                axis,
                axes(),
                listed,
            ));
            return Vec::new();
        }
    }
    let mut axes: Vec<String> = up
        .axes
        .iter()
        .filter(|a| select.iter().any(|(s, _)| s == *a) || (cell.coords.contains_key(a)))
        .cloned()
        .collect();
    axes.sort();
    let values = axes
        .iter()
        .map(|a| match select.iter().find(|(s, _)| s == a) {
            Some((_, v)) => v,
            None => &cell.coords[a],
        });
    let key = join_key(values);
    let matched = joins.lookup(u, up, &axes, &key).to_vec();
    if matched.is_empty() {
        let wanted: Vec<String> = axes
            .iter()
            .map(|a| {
                let v = select
                    .iter()
                    .find(|(s, _)| s == a)
                    .map_or_else(|| &cell.coords[a], |(_, v)| v);
                format!("{a}={}", matrix::value_text(v))
            })
            .collect();
        problems.push(
            Problem::new(format!(
                "stage `{id}`: no cell of `{}` has {}",
                up.name,
                wanted.join(",")
            ))
            .at(span, "matches no upstream cell")
            .help(format!(
                "matrix stages are joined on the axes they share; give `{}` the same values on {}",
                up.name,
                list_names(axes.iter().map(String::as_str))
            )),
        );
    }
    matched
}

/// Merges identical cells of one stage (same kind, params, inputs and resources).
fn merge_cells(plan: &mut StagePlan) {
    if plan.instances.len() <= 1 {
        plan.cell_instance = (0..plan.instances.len()).collect();
        return;
    }
    let instances = std::mem::take(&mut plan.instances);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_key: HashMap<[u8; 32], usize> = HashMap::new();
    let mut cell_group = Vec::with_capacity(instances.len());
    for inst in &instances {
        let key = identity(inst);
        let g = *by_key.entry(key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(cell_group.len());
        cell_group.push(g);
    }
    if groups.len() == instances.len() {
        plan.cell_instance = (0..instances.len()).collect();
        plan.instances = instances;
        return;
    }
    // Each group keeps its first cell, with only the coordinates all its cells agree on.
    let mut merged: Vec<StageInstance> = Vec::with_capacity(groups.len());
    for group in &groups {
        let mut first = instances[group[0]].clone();
        let coords = &plan.cells[group[0]].coords;
        let agreed: matrix::Coords = coords
            .iter()
            .filter(|(axis, v)| {
                group
                    .iter()
                    .all(|&c| plan.cells[c].coords.get(axis).map(value_key) == Some(value_key(v)))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        first.id = instance_id(&plan.name, &agreed);
        first.matrix = agreed
            .iter()
            .filter_map(|(k, v)| v.to_json().ok().map(|j| (k.clone(), j)))
            .collect();
        merged.push(first);
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &merged {
        *count.entry(m.id.clone()).or_default() += 1;
    }
    for (g, m) in merged.iter_mut().enumerate() {
        if count[&m.id] > 1 {
            let full = &instances[groups[g][0]];
            m.id = full.id.clone();
            m.matrix = full.matrix.clone();
        }
    }
    plan.cell_instance = cell_group;
    plan.instances = merged;
}

/// What makes two cells the same work: kind, canonical params, inputs, resources; hashed,
/// so that a 100,000-cell matrix keeps 32 bytes per cell, not the whole text.
fn identity(inst: &StageInstance) -> [u8; 32] {
    let mut key = String::with_capacity(256);
    key.push_str(&inst.kind);
    key.push('\u{1f}');
    // The key's own canonical form, so cells merge exactly when their params key the same.
    crate::keys::write_canonical_object(&inst.params, &mut key);
    key.push('\u{1f}');
    for (port, refs) in &inst.inputs {
        key.push_str(port);
        key.push('=');
        for r in refs {
            key.push_str(&format!("{r:?};"));
        }
    }
    key.push_str(&format!("\u{1f}{:?}", inst.resources));
    *blake3::hash(key.as_bytes()).as_bytes()
}
