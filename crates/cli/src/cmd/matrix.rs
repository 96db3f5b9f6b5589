//! `--matrix NAME=REF1,REF2`: one run per value of a flake input, submitted together,
//! followed one after the other, reported side by side.

use crate::cmd::submit::{check_cached, get_report, submit};
use crate::{Client, Format, OutputArgs, RunArgs, watch};
use anyhow::bail;
use nixfarm_core::report_matrix::{Matrix, MatrixCell};
use std::collections::BTreeMap;

/// Most cells of one matrix.
const MAX_CELLS: usize = 16;

/// NAME=REF1,REF2,… → (NAME, [REF1, REF2, …]).
pub(crate) fn parse(spec: &str) -> anyhow::Result<(String, Vec<String>)> {
    let Some((name, refs)) = spec.split_once('=') else {
        bail!("--matrix {spec}: expected NAME=REF1,REF2 (an input name, then its values)");
    };
    let refs: Vec<String> = refs
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(String::from)
        .collect();
    if name.trim().is_empty() || refs.is_empty() {
        bail!("--matrix {spec}: expected NAME=REF1,REF2 (an input name, then its values)");
    }
    if refs.len() > MAX_CELLS {
        bail!("--matrix: {} values; at most {MAX_CELLS}", refs.len());
    }
    Ok((name.trim().to_string(), refs))
}

pub(crate) async fn matrix(
    client: &Client,
    source: &str,
    run: &RunArgs,
    spec: &str,
    out: &OutputArgs,
) -> anyhow::Result<i32> {
    let (input, refs) = parse(spec)?;
    // Submitted together: the farm builds every cell at once.
    let mut ids = Vec::new();
    for r in &refs {
        let mut cell = run.clone();
        cell.matrix = None;
        cell.override_inputs.extend([input.clone(), r.clone()]);
        let id = submit(client, source, &cell, &BTreeMap::new(), &cell.attrs, None).await?;
        note!("{input} = {r}: run {id}");
        ids.push(id);
    }
    let mut cells = Vec::new();
    for (r, id) in refs.iter().zip(&ids) {
        note!("following {input} = {r} (run {id})");
        if let watch::End::Detached = watch::watch(client, id).await? {
            crate::watch::say_detached(&ids);
            return Ok(130);
        }
        let mut report = get_report(client, id).await?;
        check_cached(&mut report, &run.into()).await?;
        cells.push(MatrixCell {
            reference: r.clone(),
            report,
        });
    }
    let m = Matrix { input, cells };
    let text = match out.format.unwrap_or(Format::Table) {
        Format::Table => m.to_table(if out.wide {
            None
        } else {
            crate::output::stdout_columns()
        }),
        Format::Json => m.to_json() + "\n",
        Format::Markdown => m.to_markdown(),
        Format::Junit => m.to_junit(),
        Format::Github => m.to_github(),
    };
    out_raw!("{text}");
    if let Ok(path) = std::env::var("GITHUB_STEP_SUMMARY")
        && !path.is_empty()
    {
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, m.to_markdown().as_bytes()));
    }
    if let Some(c) = m
        .cells
        .iter()
        .find(|c| c.report.state == nixfarm_core::RunState::Failed)
    {
        note!(
            "error: run {} ({} = {}) failed: {}",
            c.report.run_id,
            m.input,
            c.reference,
            c.report.error
        );
        return Ok(2);
    }
    if let Some(pct) = out.fail_under
        && m.below(pct)
    {
        note!(
            "readiness {:.1}% (the lowest cell) is below --fail-under {pct}%",
            m.min_percent()
        );
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn matrix_specs() {
        let (n, r) = parse("nixpkgs=github:a/b, github:a/c").unwrap();
        assert_eq!(n, "nixpkgs");
        assert_eq!(r, ["github:a/b", "github:a/c"]);
        assert!(parse("nixpkgs").is_err());
        assert!(parse("=x").is_err());
        assert!(parse("n=").is_err());
    }
}
