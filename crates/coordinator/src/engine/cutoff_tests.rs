//! Agents cut off when what admitted them is taken back: a certificate revoked, a named or
//! join token replaced, while the coordinator runs or while it was down.

use super::tests::{
    TestAgent, assigned, connect_agent, one_package_run_with, registration, report_built,
    test_engine,
};
use super::*;

/// A certificate revoked while its agent works: the agent is told it is cut off, its build
/// goes to another agent at once, the repository checks it owed are given up (the run does
/// not wait a lease for them), and it cannot register again.
#[test]
fn an_agent_whose_certificate_is_revoked_is_cut_off_and_cannot_come_back() {
    use crate::credentials::Credential;
    let (engine, _clock, dir) = test_engine(EngineOptions::default());
    let file = dir.path().join("revoked");
    std::fs::write(&file, "").unwrap();
    let revoked = Arc::new(crate::revoked::Revoked::open(Some(file.clone())).unwrap());
    engine.use_gate(crate::credentials::Gate {
        revoked: Some(revoked.clone()),
        agents: None,
    });
    let fp = "ab".repeat(32);
    let by_cert = |name: &str| Registration {
        credential: Credential::Certificate(fp.clone()),
        ..registration(name, "")
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let (conn, session) = engine.connect_agent(by_cert("a"), tx).unwrap();
    let mut a = TestAgent { conn, session, rx };
    let (run, _, out, _) = one_package_run_with(&engine, &mut a, true);
    let (attempt, _) = assigned(&mut a.rx);

    std::fs::write(&file, format!("{fp}\n")).unwrap();
    assert!(!revoked.reload(), "taken once it stood still for a look");
    assert!(revoked.reload());
    assert_eq!(engine.cut_off_certificates(), vec!["a".to_string()]);
    let told: Vec<ToAgent> = std::iter::from_fn(|| a.rx.try_recv().ok()).collect();
    assert!(
        told.iter()
            .any(|m| matches!(m, ToAgent::CutOff { why } if why.contains("revoked"))),
        "{told:?}"
    );
    // Its late result counts for nothing.
    report_built(&engine, "a", a.conn, attempt, &out);
    let repo = engine.report(&run).unwrap().repository;
    assert!(
        repo.len() == 1 && !repo[0].ok && repo[0].message.contains("revoked"),
        "{repo:?}"
    );
    // Another agent gets the build at once, and the run ends with it.
    let mut b = connect_agent(&engine, "b");
    let (attempt, _) = assigned(&mut b.rx);
    report_built(&engine, "b", b.conn, attempt, &out);
    assert_eq!(engine.run_state(&run).unwrap(), RunState::Finished);
    let (tx, _rx) = mpsc::unbounded_channel();
    let again = engine.connect_agent(by_cert("a2"), tx).unwrap_err();
    assert!(matches!(again, EngineError::Denied(_)), "{again}");
}

/// A named token taken back cuts off the agent admitted with it, but not the same agent
/// come back with its new token before the cut-off ran; a stream admitted with the old
/// token cannot register any more.
#[test]
fn taking_back_a_named_token_cuts_off_only_what_the_old_token_admitted() {
    use crate::credentials::{Credential, Credentials, Gate};
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let (old, new) = ("one-0123456789abcdef", "one-fedcba9876543210");
    let tokens = Arc::new(Credentials::new(None, vec![("one".into(), old.into())]).unwrap());
    engine.use_gate(Gate {
        revoked: None,
        agents: Some(tokens.clone()),
    });
    let named = |at: u64, session: &str| Registration {
        credential: Credential::NamedToken("one".into()),
        admitted_at: at,
        ..registration("one", session)
    };
    let (_, at_old) = tokens.admit_at(old).unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let (_, session) = engine.connect_agent(named(at_old, ""), tx).unwrap();
    tokens.replace_named(vec![("one".into(), new.into())]);
    let (tx, _) = mpsc::unbounded_channel();
    let late = engine
        .connect_agent(named(at_old, &session), tx)
        .unwrap_err();
    assert!(matches!(late, EngineError::Denied(_)), "{late}");
    // Back with the new token before the cut-off: left alone.
    let (_, at_new) = tokens.admit_at(new).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.connect_agent(named(at_new, &session), tx).unwrap();
    assert!(engine.cut_off_named(&tokens).is_empty());
    assert!(
        std::iter::from_fn(|| rx.try_recv().ok()).all(|m| !matches!(m, ToAgent::CutOff { .. }))
    );
    // Its line taken out: cut off.
    tokens.replace_named(vec![]);
    assert_eq!(engine.cut_off_named(&tokens), vec!["one".to_string()]);
    assert!(std::iter::from_fn(|| rx.try_recv().ok()).any(|m| matches!(m, ToAgent::CutOff { .. })));
}

/// A coordinator restarted after an agent's named token, or the join token, was replaced
/// while it was down: the agents admitted by the old ones (known by the digest kept with
/// their registration) are cut off at once; one kept by an older coordinator (no digest)
/// is left to reconnect.
#[test]
fn tokens_replaced_while_the_coordinator_was_down_cut_off_their_agents() {
    use crate::credentials::{Credential, Credentials, TokenDigest};
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let reg = |name: &str, credential: Credential, token: &str| Registration {
        credential,
        token_digest: if token.is_empty() {
            String::new()
        } else {
            TokenDigest::of(token).0
        },
        ..registration(name, "")
    };
    for r in [
        reg(
            "one",
            Credential::NamedToken("one".into()),
            "one-0123456789abcdef",
        ),
        reg(
            "two",
            Credential::NamedToken("two".into()),
            "two-0123456789abcdef",
        ),
        reg("joined", Credential::JoinToken, "join-0123456789abcdef"),
        reg("legacy", Credential::JoinToken, ""),
    ] {
        let (tx, _rx) = mpsc::unbounded_channel();
        engine.connect_agent(r, tx).unwrap();
    }
    // As the file says now: one's token and the join token replaced, two's the same.
    let tokens = Credentials::new(
        Some("join-fedcba9876543210".into()),
        vec![
            ("one".into(), "one-fedcba9876543210".into()),
            ("two".into(), "two-0123456789abcdef".into()),
        ],
    )
    .unwrap();
    let mut cut = engine.cut_off_named(&tokens);
    cut.sort();
    assert_eq!(cut, vec!["joined".to_string(), "one".to_string()]);
}

/// A name the named tokens file lists is that token's: a join token's agent cannot take it
/// (say while its agent is away after a restart, with the jobs it had), and one that held
/// it before the name was listed is cut off when the file is read again.
#[test]
fn a_listed_name_is_its_tokens_alone() {
    use crate::credentials::{Credential, Credentials, Gate, NAME_RESERVED};
    let (engine, _clock, _dir) = test_engine(EngineOptions::default());
    let tokens = Arc::new(
        Credentials::new(
            Some("join-0123456789abcdef".into()),
            vec![("alice".into(), "alice-0123456789abcdef".into())],
        )
        .unwrap(),
    );
    engine.use_gate(Gate {
        revoked: None,
        agents: Some(tokens.clone()),
    });
    let as_join = |name: &str| Registration {
        credential: Credential::JoinToken,
        ..registration(name, "")
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let e = engine.connect_agent(as_join("alice"), tx).unwrap_err();
    assert!(
        matches!(&e, EngineError::Denied(why) if why == NAME_RESERVED),
        "{e}"
    );
    let (tx, _rx_alice) = mpsc::unbounded_channel();
    let alice = Registration {
        credential: Credential::NamedToken("alice".into()),
        ..registration("alice", "")
    };
    engine.connect_agent(alice, tx).unwrap();
    let (tx, _rx_bob) = mpsc::unbounded_channel();
    engine.connect_agent(as_join("bob"), tx).unwrap();
    // bob's name is listed now: the join token's bob goes, alice stays.
    tokens.replace_named(vec![
        ("alice".into(), "alice-0123456789abcdef".into()),
        ("bob".into(), "bob-0123456789abcdef".into()),
    ]);
    assert_eq!(engine.cut_off_named(&tokens), vec!["bob".to_string()]);
}
