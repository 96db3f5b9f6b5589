//! `nixfarm cancel`: nothing new starts for the run; its running builds are stopped.

use crate::{Client, status_error};
use nixfarm_proto::v1 as pb;

pub async fn cancel_cmd(client: &Client, run: String) -> anyhow::Result<i32> {
    let r = client
        .raw()
        .cancel_run(client.req(pb::CancelRunRequest {
            run_id: run.clone(),
        }))
        .await
        .map_err(status_error)?;
    if r.into_inner().cancelled {
        note!("cancelled run {run}");
    } else {
        // Finished, failed or cancelled before: its report says which.
        note!("run {run} had already ended (nixfarm report {run} says how)");
    }
    Ok(0)
}
