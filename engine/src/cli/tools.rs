//! `emflow bench` and `emflow serve`: commands whose work lives outside the engine (in the
//! model layer and stage kinds) and reaches the CLI through the [`Registry`].

use std::path::Path;

use anyhow::{anyhow, bail};

use crate::kind::Registry;

/// Runs benchmark `name` with `args`, or lists the benchmarks when `name` is `None`.
pub fn bench(registry: &Registry, name: Option<&str>, args: &[String]) -> anyhow::Result<u8> {
    let Some(name) = name else {
        println!("Benchmarks (emflow bench NAME):");
        for (name, bench) in registry.benches() {
            println!("  {name:<8} {}", bench.summary);
        }
        return Ok(0);
    };
    let bench = registry.bench(name).ok_or_else(|| {
        let known: Vec<&str> = registry.benches().map(|(n, _)| n).collect();
        anyhow!("no benchmark `{name}`; known: {}", known.join(", "))
    })?;
    (bench.run)(args)?;
    Ok(0)
}

/// Hands `emflow serve` to the registered `serve` command.
pub fn serve(
    registry: &Registry,
    model: &Path,
    adapter: Option<&Path>,
    addr: &str,
    name: Option<&str>,
    cuda: Option<usize>,
) -> anyhow::Result<u8> {
    let Some(command) = registry.command("serve") else {
        bail!("this build of emflow has no `serve` command");
    };
    let mut args = vec![
        "--model".to_string(),
        model.display().to_string(),
        "--addr".to_string(),
        addr.to_string(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".to_string(), a.display().to_string()]);
    }
    if let Some(n) = name {
        args.extend(["--name".to_string(), n.to_string()]);
    }
    if let Some(c) = cuda {
        args.extend(["--cuda".to_string(), c.to_string()]);
    }
    (command.run)(&args)?;
    Ok(0)
}
