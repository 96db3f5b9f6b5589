//! Agents' messages at the edge: what an agent sends, checked and turned into the engine's
//! domain types (a malformed result becomes its attempt's failure), and what the engine
//! sends back, on the wire.

use super::*;

impl TryFrom<pb::AgentMessage> for FromAgent {
    type Error = WireError;
    /// A malformed result is still a result: it becomes a failure of its attempt (so the
    /// job is retried, not left hanging); only messages that answer no attempt are refused.
    fn try_from(m: pb::AgentMessage) -> Result<Self, WireError> {
        use pb::agent_message::Msg;
        let malformed = |e: WireError| (format!("the agent sent a malformed result: {e}"), true);
        Ok(match m.msg {
            Some(Msg::Heartbeat(h)) => FromAgent::Heartbeat {
                running: h.running_attempts,
                draining: h.draining,
                // Shown to people as one line (`nixfarm agents`, the web page).
                paused: nixfarm_core::fit::one_line(
                    &h.paused.chars().take(500).collect::<String>(),
                ),
            },
            Some(Msg::Log(l)) => FromAgent::Log {
                attempt: l.attempt_id,
                data: l.data,
            },
            Some(Msg::EvalList(r)) => {
                let repository = repo_checks(r.repository);
                let follows = r.repository_follows && r.error.is_empty();
                // A malformed evaluation costs only itself: the attributes are evaluated
                // again by tasks.
                let evaluated = r.evaluated.and_then(|e| {
                    eval_chunk_from_wire(e)
                        .map_err(|e| tracing::warn!("ignoring a listing's evaluation: {e}"))
                        .ok()
                });
                FromAgent::EvalList {
                    attempt: r.attempt_id,
                    result: err_or(truncate(r.error, lim::MAX_MESSAGE), r.infra, r.attrs)
                        .and_then(list_attrs)
                        .map(|attrs| (attrs, repository)),
                    follows,
                    evaluated,
                }
            }
            Some(Msg::RepoChecks(r)) => FromAgent::RepoChecks {
                attempt: r.attempt_id,
                checks: repo_checks(r.repository),
            },
            Some(Msg::EvalChunk(mut r)) => {
                let attempt = std::mem::take(&mut r.attempt_id);
                let (error, infra) = (std::mem::take(&mut r.error), r.infra);
                FromAgent::EvalChunk {
                    attempt,
                    result: err_or(truncate(error, lim::MAX_MESSAGE), infra, ())
                        .and_then(|()| eval_chunk_from_wire(r).map_err(malformed)),
                }
            }
            Some(Msg::Build(b)) => {
                let status =
                    pb::BuildStatus::try_from(b.status).unwrap_or(pb::BuildStatus::Unspecified);
                // Hashes read only of a bounded count of outputs (more are refused below).
                let hashes = match b.outputs.len() {
                    0..=64 => nar_hashes_from_wire(&b.outputs),
                    _ => Ok(Default::default()),
                };
                let outputs = outputs_from_wire(b.outputs).and_then(|o| hashes.map(|h| (o, h)));
                // A mismatch names two hashes of one algorithm, in SRI form as agents send
                // them: its "got" is what the CLI offers to write into the user's files.
                let (outputs, mismatch) = match status {
                    pb::BuildStatus::HashMismatch => {
                        match sri_mismatch(&b.specified_hash, &b.got_hash) {
                            Ok(pair) => (outputs, Some(pair)),
                            Err(e) => (Err(e), None),
                        }
                    }
                    _ => (outputs, None),
                };
                // Where a copied hash came from is a derivation, or it is not said.
                let copied = if b.copied_from.is_empty() {
                    Ok(None)
                } else {
                    StorePath::parse_drv(&b.copied_from).map(Some).map_err(|e| {
                        WireError(format!(
                            "the derivation a copied hash came from ({:?}): {e}",
                            lim::clip(&b.copied_from, 80)
                        ))
                    })
                };
                let (outputs, copied_from) = match copied {
                    Ok(c) => (outputs, c),
                    Err(e) => (Err(e), None),
                };
                let (kind, (outputs, nar_hashes), message) = match (status, outputs) {
                    (pb::BuildStatus::Unspecified, _) => (
                        BuildOutcome::InfraFailed,
                        Default::default(),
                        "the agent sent a build result without a status".to_string(),
                    ),
                    (_, Err(e)) => (
                        BuildOutcome::InfraFailed,
                        Default::default(),
                        malformed(e).0,
                    ),
                    (s, Ok(o)) => {
                        let kind = match s {
                            pb::BuildStatus::Built => BuildOutcome::Built,
                            pb::BuildStatus::Failed => BuildOutcome::BuildFailed,
                            pb::BuildStatus::HashMismatch => BuildOutcome::HashMismatch,
                            pb::BuildStatus::TimedOut => BuildOutcome::TimedOut,
                            pb::BuildStatus::Cancelled => BuildOutcome::Cancelled,
                            pb::BuildStatus::NotCached => BuildOutcome::NotCached,
                            pb::BuildStatus::NotReproducible => BuildOutcome::NotReproducible,
                            pb::BuildStatus::InfraFailed | pb::BuildStatus::Unspecified => {
                                BuildOutcome::InfraFailed
                            }
                        };
                        (kind, o, truncate(b.message, lim::MAX_MESSAGE))
                    }
                };
                // Hashes only with a mismatch, checked above.
                let (specified, got) = match (kind, mismatch) {
                    (BuildOutcome::HashMismatch, Some((s, g))) => (Some(s), Some(g)),
                    _ => (None, None),
                };
                FromAgent::Build {
                    attempt: b.attempt_id,
                    report: BuildReport {
                        kind,
                        message,
                        specified,
                        got,
                        outputs,
                        // Bounded: it becomes a scheduling cost and is summed.
                        duration_ms: b.duration_ms.min(crate::scheduler::MAX_COST),
                        log_tail: truncate(b.log_tail, lim::MAX_MESSAGE),
                        substituted: b.substituted,
                        already_valid: b.already_valid,
                        agent: String::new(),
                        failed_root: None,
                        copied_from,
                        smoke: match pb::SmokeOutcome::try_from(b.smoke) {
                            Ok(pb::SmokeOutcome::SmokePassed) => nixfarm_core::Smoke::Passed,
                            Ok(pb::SmokeOutcome::SmokeFailed) => nixfarm_core::Smoke::Failed,
                            Ok(pb::SmokeOutcome::SmokeSkipped) => nixfarm_core::Smoke::Skipped,
                            Ok(pb::SmokeOutcome::SmokeNotRun) | Err(_) => {
                                nixfarm_core::Smoke::NotRun
                            }
                        },
                        smoke_output: truncate(b.smoke_output, lim::MAX_MESSAGE),
                        checked: b.checked,
                        nar_hashes,
                    },
                }
            }
            Some(Msg::Register(_)) => {
                return Err(WireError("an agent registers only once per stream".into()));
            }
            None => return Err(WireError("empty agent message".into())),
        })
    }
}

/// A message to an agent on the wire; a cut-off ends its stream with that refusal.
impl TryFrom<ToAgent> for pb::CoordinatorMessage {
    type Error = Status;

    fn try_from(m: ToAgent) -> Result<Self, Status> {
        use pb::coordinator_message::Msg;
        let msg = match m {
            ToAgent::CutOff { why } => return Err(Status::permission_denied(why)),
            ToAgent::Cancel { attempt } => Msg::Cancel(pb::Cancel {
                attempt_id: attempt,
            }),
            ToAgent::Drain => Msg::Drain(pb::Drain {}),
            ToAgent::RunEnded { run_id } => Msg::RunEnded(pb::RunEnded { run_id }),
            ToAgent::Assign {
                attempt,
                run_id,
                job,
            } => {
                use pb::assignment::Job as J;
                let job = match job {
                    Job::EvalList {
                        source,
                        entry,
                        attr_path,
                        memory_mib,
                        evaluate_up_to,
                        cache,
                        skip_cached,
                        build_limits,
                        trusted_public_keys,
                    } => J::EvalList(pb::EvalListJob {
                        entry: Some(entry_to_wire(&entry)),
                        source: Some(source_to_wire(&source)),
                        attr_path,
                        cache,
                        eval_memory_mib: memory_mib,
                        evaluate_up_to,
                        skip_cached,
                        build_timeout_secs: build_limits.timeout_secs,
                        build_max_silent_secs: build_limits.max_silent_secs,
                        trusted_public_keys,
                    }),
                    Job::EvalChunk {
                        source,
                        entry,
                        attr_path,
                        attrs,
                        listed_as_throwing,
                        cache,
                        memory_mib,
                        skip_cached,
                        build_limits,
                        trusted_public_keys,
                    } => J::EvalChunk(pb::EvalChunkJob {
                        entry: Some(entry_to_wire(&entry)),
                        source: Some(source_to_wire(&source)),
                        attr_path,
                        attrs,
                        cache,
                        eval_memory_mib: memory_mib,
                        skip_cached,
                        build_timeout_secs: build_limits.timeout_secs,
                        build_max_silent_secs: build_limits.max_silent_secs,
                        listed_as_throwing,
                        trusted_public_keys,
                    }),
                    Job::Build {
                        drv_path,
                        cache,
                        trusted_public_keys,
                        timeout_secs,
                        max_silent_secs,
                        smoke,
                        background,
                        check,
                        hold,
                        expect,
                    } => J::Build(pb::BuildJob {
                        drv_path: drv_path.into(),
                        cache,
                        trusted_public_keys,
                        timeout_secs,
                        max_silent_secs,
                        smoke: smoke.is_some(),
                        main_program: smoke.unwrap_or_default(),
                        background,
                        check,
                        hold: match hold {
                            Hold::No => pb::HoldOutputs::None,
                            Hold::FarmCache => pb::HoldOutputs::FarmCache,
                            Hold::SharedStore => pb::HoldOutputs::SharedStore,
                            Hold::BuilderStore => pb::HoldOutputs::BuilderStore,
                        } as i32,
                        expect: expect
                            .into_iter()
                            .map(|(name, path, h)| pb::DrvOutput {
                                name,
                                path: path.into(),
                                nar_hash: h.to_string(),
                            })
                            .collect(),
                    }),
                };
                Msg::Assign(pb::Assignment {
                    attempt_id: attempt,
                    run_id,
                    job: Some(job),
                })
            }
        };
        Ok(pb::CoordinatorMessage { msg: Some(msg) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_result(nar_hash: &str) -> BuildReport {
        from_wire(pb::BuildResult {
            attempt_id: "a1".into(),
            status: pb::BuildStatus::Built as i32,
            outputs: vec![pb::DrvOutput {
                name: "out".into(),
                path: "/nix/store/11111111111111111111111111111111-lib".into(),
                nar_hash: nar_hash.into(),
            }],
            ..Default::default()
        })
    }

    fn from_wire(b: pb::BuildResult) -> BuildReport {
        let m = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Build(b)),
        };
        match FromAgent::try_from(m) {
            Ok(FromAgent::Build { report, .. }) => report,
            other => panic!("{other:?}"),
        }
    }

    /// Where a copied hash came from reaches the report: a derivation's path, or the result
    /// is malformed.
    #[test]
    fn a_copied_hashs_origin_is_a_derivation_or_the_result_is_malformed() {
        let copied = |from: &str| {
            from_wire(pb::BuildResult {
                attempt_id: "a1".into(),
                status: pb::BuildStatus::HashMismatch as i32,
                specified_hash: "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                got_hash: "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=".into(),
                copied_from: from.into(),
                ..Default::default()
            })
        };
        let drv = "/nix/store/11111111111111111111111111111111-other-source.drv";
        let r = copied(drv);
        assert_eq!(r.kind, BuildOutcome::HashMismatch);
        assert_eq!(r.copied_from.as_deref(), Some(drv));
        assert_eq!(copied("").copied_from, None);
        for bad in [
            "the attacker's words\u{1b}[2J",
            "/nix/store/11111111111111111111111111111111-x",
        ] {
            let r = copied(bad);
            assert_eq!(r.kind, BuildOutcome::InfraFailed, "{bad}");
            assert!(r.message.contains("copied hash came from"), "{}", r.message);
            assert_eq!(r.copied_from, None);
        }
    }

    #[test]
    fn a_hash_mismatch_names_two_sri_hashes_of_one_algorithm_or_is_malformed() {
        const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        const GOT: &str = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=";
        let mismatch = |specified: &str, got: &str| {
            from_wire(pb::BuildResult {
                attempt_id: "a1".into(),
                status: pb::BuildStatus::HashMismatch as i32,
                specified_hash: specified.into(),
                got_hash: got.into(),
                ..Default::default()
            })
        };
        let r = mismatch(FAKE, GOT);
        assert_eq!(
            (
                r.kind,
                r.specified.as_deref().unwrap_or(""),
                r.got.as_deref().unwrap_or("")
            ),
            (BuildOutcome::HashMismatch, FAKE, GOT)
        );
        for (specified, got) in [
            (FAKE, "\"; rm -rf ~; \""),
            (FAKE, ""),
            (
                FAKE,
                "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            ),
            (FAKE, "sha1-AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            ("", GOT),
            (GOT, GOT),
        ] {
            let r = mismatch(specified, got);
            assert_eq!(r.kind, BuildOutcome::InfraFailed, "{specified} {got}");
            assert!(r.message.contains("malformed result"), "{}", r.message);
            assert!(r.got.is_none() && r.specified.is_none(), "{r:?}");
        }
    }

    #[test]
    fn an_outputs_nar_hash_is_a_sha256_or_the_result_is_malformed() {
        let sri = "sha256-AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let r = build_result(sri);
        assert_eq!(r.kind, BuildOutcome::Built);
        assert_eq!(r.nar_hashes["out"].to_string(), sri);
        // None said: none kept (only held outputs carry one).
        assert!(build_result("").nar_hashes.is_empty());
        for bad in [
            "md5:00112233445566778899aabbccddeeff",
            "sha256-short",
            "x".repeat(5000).as_str(),
        ] {
            let r = build_result(bad);
            assert_eq!(r.kind, BuildOutcome::InfraFailed, "{bad}");
            assert!(
                r.message.ends_with("output 'out': not a SHA-256 NAR hash"),
                "{}",
                r.message
            );
            assert!(r.nar_hashes.is_empty() && r.outputs.is_empty());
        }
    }
}
