//! `emflow kinds`: each kind this binary has, with its ports and params.

use std::fmt::Write as _;

use crate::kind::Registry;

/// `emflow kinds`: each kind with its params and ports.
pub fn kinds_text(registry: &Registry) -> String {
    let mut out = String::new();
    for name in registry.kind_names() {
        let Some(kind) = registry.kind(name) else {
            continue;
        };
        let spec = kind.spec();
        let _ = writeln!(out, "{} (v{}): {}", spec.name, spec.version, spec.summary);
        for p in &spec.inputs {
            let opt = if p.many {
                " (many)"
            } else if !p.required {
                " (optional)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "    in   {:<20} {:<10}{opt} {}",
                p.name,
                p.ty.name(),
                p.doc
            );
        }
        for p in &spec.outputs {
            let _ = writeln!(out, "    out  {:<20} {:<10} {}", p.name, p.ty.name(), p.doc);
        }
        for p in &spec.params {
            let default = p
                .default
                .as_ref()
                .map(|d| format!(" = {}", crate::keys::show_value(d)))
                .unwrap_or_else(|| " (required)".into());
            let _ = writeln!(
                out,
                "    param {:<19} {:<10}{default}  {}",
                p.name,
                format!("{:?}", p.ty).to_lowercase(),
                p.doc
            );
        }
        if spec.open_params {
            let _ = writeln!(out, "    (accepts further params of any name)");
        }
    }
    out
}
