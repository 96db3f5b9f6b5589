//! `nixfarm runs`: every run the coordinator keeps, one line each.

use crate::output::Listing;
use crate::{Client, status_error};
use nixfarm_proto::v1 as pb;

pub async fn runs_cmd(client: &Client) -> anyhow::Result<i32> {
    let runs = client
        .raw()
        .list_runs(client.req(pb::ListRunsRequest {}))
        .await
        .map_err(status_error)?
        .into_inner()
        .runs;
    let mut t = Listing::new(&["run", "state", "ready", "source"], 3);
    for r in runs {
        // Whatever a coordinator stored, one row stays one line of sane width.
        let label: String = nixfarm_core::limits::clip(&r.label, 120)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        t.add_row(vec![
            nixfarm_core::limits::clip(&r.run_id, 64).to_string(),
            nixfarm_core::limits::clip(&r.state, 32).to_string(),
            format!("{}/{}", r.ready, r.total),
            label,
        ]);
    }
    out_raw!("{}", t.render());
    Ok(0)
}
