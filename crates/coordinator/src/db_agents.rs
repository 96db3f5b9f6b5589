//! Agents as the database keeps them (their last registration) and the upload claims that
//! let one agent at a time push a path to the farm cache.

use crate::db::{Db, DbError, bad_column, json_column};
use crate::model::Registration;
use rusqlite::{OptionalExtension, params};

impl Db {
    pub fn upsert_agent(&self, reg: &Registration, now_ms: i64) -> Result<(), DbError> {
        let (name, info) = (
            &reg.name,
            serde_json::to_string(reg).map_err(|e| bad_column(1, "agent", e))?,
        );
        self.conn().execute(
            "INSERT INTO agents(name, info, last_seen_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET info = excluded.info, last_seen_ms = excluded.last_seen_ms",
            params![name, info, now_ms],
        )?;
        Ok(())
    }

    /// Forgets agent `name`: its registration and its upload claims.
    pub fn forget_agent(&self, name: &str) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM upload_claims WHERE agent = ?1", params![name])?;
        self.conn()
            .execute("DELETE FROM agents WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// Claims each of `paths` in `cache` for `agent` where it is unclaimed, already the
    /// agent's, or `lapsed(holder, claimed_ms)` says the holder's claim lapsed; one
    /// transaction. Returns, per path, whether the agent now holds it.
    pub fn claim_uploads(
        &mut self,
        cache: &str,
        agent: &str,
        paths: &[String],
        now_ms: i64,
        lapsed: &dyn Fn(&str, i64) -> bool,
    ) -> Result<Vec<bool>, DbError> {
        self.tx(|tx| {
            let mut get = tx.prepare_cached(
                "SELECT agent, claimed_ms FROM upload_claims WHERE cache = ?1 AND path = ?2",
            )?;
            let mut set = tx.prepare_cached(
                "INSERT INTO upload_claims(cache, path, agent, claimed_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(cache, path) DO UPDATE SET agent = excluded.agent, claimed_ms = excluded.claimed_ms",
            )?;
            let mut granted = Vec::with_capacity(paths.len());
            for p in paths {
                let held: Option<(String, i64)> = get
                    .query_row(params![cache, p], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let free = match &held {
                    None => true,
                    Some((holder, at)) => holder == agent || lapsed(holder, *at),
                };
                if free {
                    set.execute(params![cache, p, agent, now_ms])?;
                }
                granted.push(free);
            }
            Ok(granted)
        })
    }

    /// Drops `agent`'s claims older than `before_ms` (they outlived any upload) and returns
    /// how many it still holds.
    pub fn prune_upload_claims(&mut self, agent: &str, before_ms: i64) -> Result<usize, DbError> {
        let c = self.conn_mut();
        c.execute(
            "DELETE FROM upload_claims WHERE agent = ?1 AND claimed_ms < ?2",
            params![agent, before_ms],
        )?;
        let held: i64 = c.query_row(
            "SELECT COUNT(*) FROM upload_claims WHERE agent = ?1",
            params![agent],
            |r| r.get(0),
        )?;
        Ok(held.max(0) as usize)
    }

    /// Drops `agent`'s claims on `paths` in `cache`.
    pub fn release_upload_claims(
        &self,
        agent: &str,
        cache: &str,
        paths: &[String],
    ) -> Result<(), DbError> {
        let mut st = self.conn().prepare_cached(
            "DELETE FROM upload_claims WHERE agent = ?1 AND cache = ?2 AND path = ?3",
        )?;
        for p in paths {
            st.execute(params![agent, cache, p])?;
        }
        Ok(())
    }

    /// Drops every claim `agent` holds, in any cache.
    pub fn release_all_upload_claims(&self, agent: &str) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM upload_claims WHERE agent = ?1", params![agent])?;
        Ok(())
    }

    pub fn agents(&self) -> Result<Vec<(Registration, i64)>, DbError> {
        let mut st = self
            .conn()
            .prepare("SELECT info, last_seen_ms FROM agents ORDER BY name")?;
        st.query_map([], |r| Ok((json_column(r, 0, "agent")?, r.get(1)?)))?
            .collect()
    }
}
