//! `nixfarm agents`: each agent (connected, paused, what it builds), protocol violations,
//! agents that predate held outputs, the run caches agents take, the certificates agents
//! were admitted by, and every waiting job of the farm grouped by why it waits.

use crate::output::Listing;
use crate::{Client, short_name, status_error};
use nixfarm_proto::v1 as pb;

pub async fn agents_cmd(client: &Client) -> anyhow::Result<i32> {
    let resp = client
        .raw()
        .list_agents(client.req(pb::ListAgentsRequest {}))
        .await
        .map_err(status_error)?
        .into_inner();
    let (agents, waiting) = (resp.agents, resp.waiting);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut t = Listing::new(
        &[
            "agent",
            "connected",
            "last seen",
            "systems",
            "jobs",
            "nix",
            "building",
        ],
        6,
    );
    let paused: Vec<String> = agents
        .iter()
        .filter(|a| a.connected && !a.paused.is_empty())
        .map(|a| {
            // The agent's own words, through the coordinator: one line, no escapes.
            let why = nixfarm_core::fit::one_line(&a.paused);
            format!("  {}: {why}", nixfarm_core::fit::one_line(&a.name))
        })
        .collect();
    let violations: Vec<String> = agents
        .iter()
        .filter(|a| a.protocol_violations > 0)
        .map(|a| format!("  {}: {}", a.name, a.protocol_violations))
        .collect();
    let older: Vec<String> = agents
        .iter()
        .filter(|a| a.connected && !a.holds_outputs)
        .map(|a| format!("  {}", a.name))
        .collect();
    let no_farm_cache: Vec<String> = agents
        .iter()
        .filter(|a| a.connected && a.without_farm_cache)
        .map(|a| format!("  {}", a.name))
        .collect();
    let listed_caches: Vec<String> = agents
        .iter()
        .filter(|a| !a.run_caches.is_empty())
        .map(|a| format!("  {}: {}", a.name, a.run_caches.join(", ")))
        .collect();
    let certificates: Vec<String> = agents
        .iter()
        .filter_map(|a| {
            let fp = a.admitted_by.strip_prefix("certificate sha256:")?;
            Some(format!("  {}: {fp}", a.name))
        })
        .collect();
    for a in agents {
        let building: Vec<String> = a
            .building
            .iter()
            .map(|d| short_name(d).to_string())
            .collect();
        t.add_row(vec![
            a.name,
            match (a.connected, a.draining, a.paused.is_empty()) {
                (false, _, _) => "no".into(),
                (true, true, _) => "yes (draining)".into(),
                (true, false, false) => "yes (paused)".into(),
                (true, false, true) => "yes".into(),
            },
            format!("{}s ago", now_ms.saturating_sub(a.last_seen_ms) / 1000),
            a.systems.join(" "),
            format!("{}/{}", a.building.len(), a.max_jobs),
            a.nix_version,
            building.join(", "),
        ]);
    }
    out_raw!("{}", t.render());
    if !paused.is_empty() {
        out!("\ntaking no new jobs:\n{}", paused.join("\n"));
    }
    if !violations.is_empty() {
        out!(
            "\nmessages refused as protocol violations (results for attempts an agent did not hold, outputs not the derivation's):\n{}",
            violations.join("\n")
        );
    }
    if !older.is_empty() {
        out!(
            "\npredating held outputs (handed no cross-checked builds of runs with a cache of their own; upgrade them):\n{}",
            older.join("\n")
        );
    }
    if !no_farm_cache.is_empty() {
        out!(
            "\nwithout the farm cache (admitted by a certificate, they predate the tokens issued for it: they take part only in runs with a cache of their own; upgrade them):\n{}",
            no_farm_cache.join("\n")
        );
    }
    if !listed_caches.is_empty() {
        out!(
            "\ntaking part only in runs with one of these caches, or none of their own (their operators' run_caches):\n{}",
            nixfarm_core::fit::printable(&listed_caches.join("\n"))
        );
    }
    if !certificates.is_empty() {
        out!(
            "\nadmitted by client certificates (SHA-256; a line in [tls] revoked_certs_file revokes one):\n{}",
            certificates.join("\n")
        );
    }
    if !waiting.is_empty() {
        out!("\nwaiting jobs:");
        for w in waiting {
            // Built from derivations' systems and features: a repository's text.
            out!(
                "  {:>6}  {} (e.g. {})",
                w.jobs,
                nixfarm_core::fit::one_line(&w.reason),
                nixfarm_core::fit::one_line(&w.example)
            );
        }
    }
    Ok(0)
}
