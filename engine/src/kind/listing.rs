//! `emflow kinds [NAME]`: each kind's ports and params as tables, from the same [`KindSpec`]
//! that validation and keys use (for typed kinds: derived from the params struct).

use std::fmt::Write as _;

use super::{KindSpec, ParamSpec, PortSpec, Registry};
use crate::diagnostics::{did_you_mean, list_names};

/// Longest default shown in a table cell; longer ones (judge prompts) are cut with `…`.
const DEFAULT_WIDTH: usize = 28;

/// Every kind (or only `only`), a header and three tables each. `Err` names the kinds when
/// `only` is not one of them.
pub fn kinds_text(registry: &Registry, only: Option<&str>) -> anyhow::Result<String> {
    let names: Vec<&str> = registry.kind_names().collect();
    if let Some(name) = only.filter(|n| !names.contains(n)) {
        let hint = did_you_mean(name, names.iter().copied())
            .unwrap_or_else(|| format!("kinds: {}", list_names(names.iter().copied())));
        anyhow::bail!("no kind `{name}`; {hint}");
    }
    let mut out = String::new();
    for name in names.into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
        if let Some(kind) = registry.kind(name) {
            if !out.is_empty() {
                out.push('\n');
            }
            write_kind(&mut out, &kind.spec(), only.is_some());
        }
    }
    Ok(out)
}

/// One kind: `name (vN): summary`, then its inputs, outputs and params. With `full`, each
/// param's whole doc follows its row.
fn write_kind(out: &mut String, spec: &KindSpec, full: bool) {
    let _ = writeln!(out, "{} (v{}): {}", spec.name, spec.version, spec.summary);
    let inputs: Vec<Vec<String>> = spec.inputs.iter().map(input_row).collect();
    table(
        out,
        "inputs",
        &["name", "type", "wiring", "doc"],
        &inputs,
        &[],
    );
    let outputs: Vec<Vec<String>> = spec.outputs.iter().map(output_row).collect();
    table(out, "outputs", &["name", "type", "doc"], &outputs, &[]);
    let params: Vec<Vec<String>> = spec.params.iter().map(param_row).collect();
    let more: Vec<String> = spec
        .params
        .iter()
        .map(|p| if full { rest_of_doc(p) } else { String::new() })
        .collect();
    table(
        out,
        "params",
        &["name", "type", "default", "range", "doc"],
        &params,
        &more,
    );
    if spec.open_params {
        let _ = writeln!(out, "  (accepts further params of any name)");
    }
}

fn input_row(p: &PortSpec) -> Vec<String> {
    let how = if p.many {
        "many"
    } else if p.required {
        "required"
    } else {
        "optional"
    };
    vec![p.name.clone(), p.ty.name().into(), how.into(), p.doc.into()]
}

fn output_row(p: &PortSpec) -> Vec<String> {
    vec![p.name.clone(), p.ty.name().into(), p.doc.into()]
}

fn param_row(p: &ParamSpec) -> Vec<String> {
    let mut ty = match &p.ty {
        super::ParamType::Enum(options) => options.join("|"),
        other => other.short_name().to_string(),
    };
    if p.nullable {
        ty.push_str("|null");
    }
    let default = match &p.default {
        None => "(required)".to_string(),
        Some(d) => cut(&crate::keys::show_value(d).replace('\n', "\\n")),
    };
    vec![
        p.name.clone(),
        ty,
        default,
        p.range.to_string(),
        p.summary().to_string(),
    ]
}

/// The doc after its first line, indented under the row, and the fields left out of the key.
fn rest_of_doc(p: &ParamSpec) -> String {
    let mut rest: String = p
        .doc
        .lines()
        .skip(1)
        .skip_while(|l| l.trim().is_empty())
        .map(|l| format!("      {l}\n"))
        .collect();
    if !p.connection_fields.is_empty() {
        let _ = writeln!(
            rest,
            "      not in the stage key (connection settings): {}",
            p.connection_fields.join(", ")
        );
    }
    if !p.entry_connection_fields.is_empty() {
        let _ = writeln!(
            rest,
            "      not in the stage key, in each entry (connection settings): {}",
            p.entry_connection_fields.join(", ")
        );
    }
    rest
}

fn cut(text: &str) -> String {
    if text.chars().count() <= DEFAULT_WIDTH {
        return text.to_string();
    }
    let kept: String = text.chars().take(DEFAULT_WIDTH - 1).collect();
    format!("{kept}…")
}

/// `title` and `rows` under a header of `columns`, each column as wide as its widest cell
/// (the last one is left ragged); `more[i]`, when not empty, is printed after row `i`.
fn table(out: &mut String, title: &str, columns: &[&str], rows: &[Vec<String>], more: &[String]) {
    if rows.is_empty() {
        return;
    }
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([columns[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let mut text = String::from("    ");
        for (c, cell) in cells.iter().enumerate() {
            if c + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
            }
        }
        text.trim_end().to_string()
    };
    let _ = writeln!(out, "  {title}");
    let _ = writeln!(out, "{}", line(columns));
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
        if let Some(extra) = more.get(i).filter(|m| !m.is_empty()) {
            out.push_str(extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::StageContext;
    use crate::kind::{ArtifactType, KindInfo};
    use schemars::JsonSchema;
    use serde::Deserialize;

    struct Toy;

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct ToyParams {
        /// Peak learning rate.
        ///
        /// Scaled by the batch size.
        #[serde(default = "lr")]
        #[schemars(range(min = 0.0))]
        lr: f64,
        /// Steps to run.
        steps: Option<u64>,
    }

    fn lr() -> f64 {
        1e-4
    }

    impl crate::kind::Kind for Toy {
        type Params = ToyParams;
        fn describe(&self) -> KindInfo {
            KindInfo::new("toy", 2, "a toy")
                .inputs(vec![PortSpec::input(
                    "data",
                    ArtifactType::Messages,
                    "rows",
                )])
                .outputs(vec![PortSpec::output("out", ArtifactType::File, "a file")])
        }
        fn run(&self, _: &mut StageContext, _: &ToyParams) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn params_print_aligned_from_the_struct() {
        let registry = Registry::new().with_kind(Toy);
        let text = kinds_text(&registry, None).unwrap();
        let expected = "\
toy (v2): a toy
  inputs
    name  type      wiring    doc
    data  messages  required  rows
  outputs
    name  type  doc
    out   file  a file
  params
    name   type      default  range  doc
    lr     float     0.0001   >= 0   Peak learning rate.
    steps  int|null  null     >= 0   Steps to run.
";
        assert_eq!(text, expected);
        let full = kinds_text(&registry, Some("toy")).unwrap();
        assert!(full.contains("Peak learning rate.\n      Scaled by the batch size.\n"));
        let err = kinds_text(&registry, Some("tyo")).unwrap_err().to_string();
        assert!(err.contains("did you mean `toy`"), "{err}");
    }
}
