//! Who may see what, end to end on the back end of `CDP_E2E_BACKEND`:
//! every RPC × every role (allowed or refused, and how), masking of every
//! read API, scopes, sources bound to credentials, keys issued and revoked,
//! rate limits, and the audit chain verified then broken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut};
use cdp_e2e::{
    ADMIN_KEY, AGENT_TOKEN, ANALYST_KEY, Authed, CdpProcess, DEFAULT_CONFIG, INGEST_KEY,
    OPERATOR_KEY, POS_INGEST_KEY, SCOPED_AGENT_KEY, SUPERVISOR_KEY, id, metrics, mobile,
    profile_when, touchpoint, unique,
};
use cdp_proto::v1::{self, Identifier};
use serde_json::{Value, json};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const PATIENCE: Duration = Duration::from_secs(30);

/// Sends and receives raw message bytes: every method can be called with
/// an empty request, which is all authorisation looks at.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Unary,
    ServerStream,
    Bidi,
}

/// Calls `method` with an empty request; the status code it answered.
async fn call(addr: SocketAddr, key: Option<&str>, method: &str, shape: Shape) -> Code {
    let channel = CdpProcess::connect_as(addr, key).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = method.parse().unwrap();
    let answer = match shape {
        Shape::Unary => grpc
            .unary(tonic::Request::new(Vec::new()), path, Raw)
            .await
            .map(|_| ()),
        Shape::ServerStream => {
            match grpc
                .server_streaming(tonic::Request::new(Vec::new()), path, Raw)
                .await
            {
                // A stream that started: the first item tells whether the
                // handler refused after accepting the call.
                Ok(r) => {
                    let mut stream = r.into_inner();
                    match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                        Ok(Err(s)) => Err(s),
                        _ => Ok(()),
                    }
                }
                Err(s) => Err(s),
            }
        }
        Shape::Bidi => grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(Vec::<Vec<u8>>::new())),
                path,
                Raw,
            )
            .await
            .map(|_| ()),
    };
    match answer {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Nobody,
    Ingest,
    Agent,
    Supervisor,
    Analyst,
    Operator,
    Admin,
}

impl Who {
    const ALL: [Who; 7] = [
        Who::Nobody,
        Who::Ingest,
        Who::Agent,
        Who::Supervisor,
        Who::Analyst,
        Who::Operator,
        Who::Admin,
    ];

    fn key(self) -> Option<&'static str> {
        match self {
            Who::Nobody => None,
            Who::Ingest => Some(INGEST_KEY),
            Who::Agent => Some(AGENT_TOKEN),
            Who::Supervisor => Some(SUPERVISOR_KEY),
            Who::Analyst => Some(ANALYST_KEY),
            Who::Operator => Some(OPERATOR_KEY),
            Who::Admin => Some(ADMIN_KEY),
        }
    }
}

/// Which process serves a service (one process when embedded).
#[derive(Clone, Copy)]
enum Host {
    Ingest,
    Query,
    Projection,
}

fn addr_of(cdp: &CdpProcess, host: Host) -> SocketAddr {
    match host {
        Host::Ingest => cdp.addr,
        Host::Query => cdp.query_addr(),
        Host::Projection => cdp.projection_addr(),
    }
}

/// The access matrix, written out here (not derived from the server's own
/// table): every method of the API and the roles that may call it.
fn matrix() -> Vec<(&'static str, Host, Shape, &'static [Who])> {
    use Host as H;
    use Shape as S;
    use Who as W;
    const READERS: &[Who] = &[W::Agent, W::Supervisor, W::Admin];
    const OPERATORS: &[Who] = &[W::Operator, W::Admin];
    const EVERYONE: &[Who] = &[
        W::Ingest,
        W::Agent,
        W::Supervisor,
        W::Analyst,
        W::Operator,
        W::Admin,
    ];
    vec![
        (
            "/cdp.v1.IngestService/Track",
            H::Ingest,
            S::Unary,
            &[W::Ingest],
        ),
        (
            "/cdp.v1.IngestService/TrackBatch",
            H::Ingest,
            S::Unary,
            &[W::Ingest],
        ),
        (
            "/cdp.v1.IngestService/TrackStream",
            H::Ingest,
            S::Bidi,
            &[W::Ingest],
        ),
        (
            "/cdp.v1.DeadLetterService/ListDeadLetters",
            H::Ingest,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.DeadLetterService/Redrive",
            H::Ingest,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProfileService/GetProfile",
            H::Query,
            S::Unary,
            READERS,
        ),
        (
            "/cdp.v1.ProfileService/ListTimeline",
            H::Query,
            S::Unary,
            READERS,
        ),
        (
            "/cdp.v1.ProfileService/SearchCustomers",
            H::Query,
            S::Unary,
            READERS,
        ),
        (
            "/cdp.v1.ProfileService/WatchProfile",
            H::Query,
            S::ServerStream,
            READERS,
        ),
        (
            "/cdp.v1.IdentityService/Explain",
            H::Query,
            S::Unary,
            READERS,
        ),
        (
            "/cdp.v1.IdentityService/ListMerges",
            H::Query,
            S::Unary,
            READERS,
        ),
        (
            "/cdp.v1.IdentityService/GetDecision",
            H::Query,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.IdentityService/ListQuarantined",
            H::Query,
            S::Unary,
            OPERATORS,
        ),
        ("/cdp.v1.AccessService/WhoAmI", H::Query, S::Unary, EVERYONE),
        (
            "/cdp.v1.AccessService/RevealField",
            H::Query,
            S::Unary,
            &[W::Supervisor, W::Admin],
        ),
        (
            "/cdp.v1.AccessService/ListAudit",
            H::Query,
            S::Unary,
            &[W::Supervisor, W::Admin],
        ),
        (
            "/cdp.v1.AccessService/ExportAudit",
            H::Query,
            S::ServerStream,
            &[W::Admin],
        ),
        (
            "/cdp.v1.AccessService/IssueCredential",
            H::Query,
            S::Unary,
            &[W::Admin],
        ),
        (
            "/cdp.v1.AccessService/ListCredentials",
            H::Query,
            S::Unary,
            &[W::Admin],
        ),
        (
            "/cdp.v1.AccessService/RevokeCredential",
            H::Query,
            S::Unary,
            &[W::Admin],
        ),
        (
            "/cdp.v1.ProjectionService/GetRebuild",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProjectionService/CancelRebuild",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProjectionService/ListGenerations",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProjectionService/ActivateGeneration",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProjectionService/DropGeneration",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProjectionService/GetPipelineStatus",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ProjectionService/CompareGenerations",
            H::Projection,
            S::Unary,
            OPERATORS,
        ),
        (
            "/cdp.v1.ReplayService/Replay",
            H::Projection,
            S::ServerStream,
            &[W::Analyst, W::Admin],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_every_role_as_the_access_matrix_says() {
    let cdp = CdpProcess::start();
    let mut wrong = Vec::new();
    for (method, host, shape, allowed) in matrix() {
        let addr = addr_of(&cdp, host);
        for who in Who::ALL {
            let code = call(addr, who.key(), method, shape).await;
            let refused = matches!(code, Code::Unauthenticated | Code::PermissionDenied);
            let expected = if who == Who::Nobody {
                Some(Code::Unauthenticated)
            } else if allowed.contains(&who) {
                None
            } else {
                Some(Code::PermissionDenied)
            };
            let fine = match expected {
                Some(c) => code == c,
                None => !refused,
            };
            if !fine {
                wrong.push(format!("{method} as {who:?}: {code:?}"));
            }
        }
    }
    // An unknown key is not a role.
    let code = call(
        cdp.query_addr(),
        Some("not-a-key-at-all"),
        "/cdp.v1.ProfileService/GetProfile",
        Shape::Unary,
    )
    .await;
    if code != Code::Unauthenticated {
        wrong.push(format!("an unknown key: {code:?}"));
    }
    // Health answers without a key; an unlisted method is refused to everyone.
    for addr in [cdp.addr, cdp.query_addr(), cdp.projection_addr()] {
        let code = call(addr, None, "/grpc.health.v1.Health/Check", Shape::Unary).await;
        if code != Code::Ok {
            wrong.push(format!("health at {addr}: {code:?}"));
        }
    }
    let code = call(
        cdp.query_addr(),
        Some(ADMIN_KEY),
        "/cdp.v1.ProfileService/DeleteEverything",
        Shape::Unary,
    )
    .await;
    if code != Code::PermissionDenied {
        wrong.push(format!("an unlisted method as admin: {code:?}"));
    }
    assert!(
        wrong.is_empty(),
        "the access matrix is broken:\n{}",
        wrong.join("\n")
    );
}

/// A customer with personal data in every place it can hide.
struct Seeded {
    digits: String,
    email: String,
    street: String,
    name: String,
    customer_id: String,
    event_id: String,
}

async fn seed(cdp: &CdpProcess, source: &str) -> Seeded {
    let digits = mobile();
    let tag = unique("");
    let email = format!("lan.{tag}@shop.vn");
    let street = format!("{tag} Lê Lợi");
    let name = format!("Trần Thị Lan{tag}");
    let mut identify = touchpoint(
        "Identify",
        "store",
        source,
        vec![id("phone", &format!("0{digits}")), id("email", &email)],
        json!({}),
    );
    if let Some(p) = identify.personal.as_mut() {
        p.traits =
            cdp_e2e::to_struct(json!({"name": name, "address": street, "birthday": "1990-02-03"}));
    }
    let event_id = identify.event_id.clone();
    cdp.track(identify).await;
    cdp.track(touchpoint(
        "Ticket Opened",
        "call_center",
        source,
        vec![id("phone", &format!("0{digits}"))],
        json!({"ticket_id": unique("t"), "subject": format!("gọi lại 0{digits} hoặc {email}")}),
    ))
    .await;
    cdp.track(touchpoint(
        "Order Completed",
        "store",
        source,
        vec![id("email", &email)],
        json!({"order_id": unique("o"), "total": 150000, "shipping_address": {"street": street}}),
    ))
    .await;
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 3
    })
    .await;
    Seeded {
        digits,
        email,
        street,
        name,
        customer_id: p.customer_id,
        event_id,
    }
}

impl Seeded {
    /// The personal values, in every form they may be printed.
    fn secrets(&self) -> Vec<String> {
        vec![
            self.digits.clone(),
            self.email.clone(),
            self.email.split('@').next().unwrap_or_default().to_owned(),
            self.street.clone(),
            "1990-02-03".to_owned(),
        ]
    }

    /// Every field of `message`, printed, holds none of the personal values.
    fn assert_hidden(&self, what: &str, message: &impl std::fmt::Debug) {
        let printed = format!("{message:?}");
        for s in self.secrets() {
            assert!(
                !printed.contains(&s),
                "{what} shows {s:?} in clear: {printed}"
            );
        }
    }
}

async fn query_as(cdp: &CdpProcess, key: &str) -> Authed {
    CdpProcess::connect_as(cdp.query_addr(), Some(key)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_api_shows_an_agent_operator_or_analyst_a_personal_value() {
    let cdp = CdpProcess::start();
    let s = seed(&cdp, "crm").await;
    let phone = Identifier {
        kind: "phone".into(),
        value: format!("0{}", s.digits),
    };
    let lookup = Some(v1::get_profile_request::Lookup::Identifier(phone.clone()));

    // The agent: the view, its timeline, search, the live view, explanations.
    let agent = query_as(&cdp, AGENT_TOKEN).await;
    let mut profiles = v1::profile_service_client::ProfileServiceClient::new(agent.clone());
    let view = profiles
        .get_profile(v1::GetProfileRequest {
            lookup: lookup.clone(),
            timeline_limit: 50,
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    s.assert_hidden("GetProfile", &view);
    let p = view.profile.unwrap();
    let shown: Vec<&str> = p.identifiers.iter().map(|i| i.value.as_str()).collect();
    let national = format!("0{}", s.digits);
    let masked_phone = format!("{}***{}", &national[..4], &national[national.len() - 3..]);
    assert!(shown.contains(&masked_phone.as_str()), "{shown:?}");
    assert!(shown.contains(&"l***@shop.vn"), "{shown:?}");
    // Agents greet customers by name (access.visible_to_agents).
    let traits = cdp_proto::convert::struct_to_json(p.traits.as_ref().unwrap());
    assert_eq!(traits["name"], json!(s.name));
    let past = profiles
        .get_profile(v1::GetProfileRequest {
            lookup: lookup.clone(),
            timeline_limit: 50,
            as_of: Some(cdp_proto::convert::millis_to_timestamp(cdp_e2e::now_ms())),
        })
        .await
        .unwrap()
        .into_inner();
    s.assert_hidden("GetProfile as_of", &past);
    let timeline = profiles
        .list_timeline(v1::ListTimelineRequest {
            lookup: Some(v1::list_timeline_request::Lookup::CustomerId(
                s.customer_id.clone(),
            )),
            page_size: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(timeline.entries.len(), 3);
    s.assert_hidden("ListTimeline", &timeline);
    for q in [s.name.clone(), format!("0{}", s.digits), s.email.clone()] {
        let found = profiles
            .search_customers(v1::SearchCustomersRequest {
                query: q.clone(),
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            found
                .candidates
                .iter()
                .any(|c| c.customer_id == s.customer_id),
            "searching {q:?} finds nothing"
        );
        s.assert_hidden("SearchCustomers", &found);
    }
    let mut watch = profiles
        .watch_profile(v1::GetProfileRequest {
            lookup: lookup.clone(),
            timeline_limit: 10,
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    s.assert_hidden("WatchProfile", &first);
    let mut identity = v1::identity_service_client::IdentityServiceClient::new(agent.clone());
    let explained = identity
        .explain(v1::ExplainRequest {
            identifiers: vec![phone.clone(), id("email", &s.email)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(explained.same_customer);
    s.assert_hidden("Explain", &explained);
    let merges = identity
        .list_merges(v1::ListMergesRequest {
            lookup: Some(v1::list_merges_request::Lookup::Identifier(phone.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    s.assert_hidden("ListMerges", &merges);

    // The operator: decisions, quarantine and dead letters, pseudonymised.
    let operator = query_as(&cdp, OPERATOR_KEY).await;
    let mut identity = v1::identity_service_client::IdentityServiceClient::new(operator);
    let decision = identity
        .get_decision(v1::GetDecisionRequest {
            event_id: s.event_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(decision.resolved && !decision.linked.is_empty());
    assert!(
        decision.linked.iter().all(|i| i.value.starts_with("ps_")),
        "{decision:?}"
    );
    s.assert_hidden("GetDecision", &decision);
    let quarantined = identity
        .list_quarantined(v1::ListQuarantinedRequest {})
        .await
        .unwrap()
        .into_inner();
    s.assert_hidden("ListQuarantined", &quarantined);
    let dead = v1::dead_letter_service_client::DeadLetterServiceClient::new(
        CdpProcess::connect_as(cdp.addr, Some(OPERATOR_KEY)).await,
    )
    .list_dead_letters(v1::ListDeadLettersRequest::default())
    .await
    .unwrap()
    .into_inner();
    s.assert_hidden("ListDeadLetters", &dead);

    // The analyst: the replay, with stable pseudonyms instead of values.
    let mut replay = v1::replay_service_client::ReplayServiceClient::new(
        CdpProcess::connect_as(cdp.projection_addr(), Some(ANALYST_KEY)).await,
    );
    let mut stream = replay
        .replay(v1::ReplayRequest {
            purpose: "service".into(),
            customer: Some(v1::replay_request::Customer::CustomerId(
                s.customer_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        events.push(e);
    }
    assert_eq!(events.len(), 3);
    s.assert_hidden("Replay", &events);
    assert!(
        !format!("{events:?}").contains(&s.name),
        "an analyst sees the name"
    );
    let pseudonyms: std::collections::BTreeSet<String> = events
        .iter()
        .flat_map(|e| {
            e.touchpoint
                .as_ref()
                .unwrap()
                .personal
                .as_ref()
                .unwrap()
                .identifiers
                .clone()
        })
        .filter(|i| i.kind == "phone")
        .map(|i| i.value)
        .collect();
    assert_eq!(
        pseudonyms.len(),
        1,
        "one phone, one stable pseudonym: {pseudonyms:?}"
    );

    // The admin's key grants clear values: the same view shows them.
    let mut clear = cdp.profiles().await;
    let view = clear
        .get_profile(v1::GetProfileRequest {
            lookup,
            timeline_limit: 1,
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(format!("{view:?}").contains(&s.email));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_reveals_one_field_with_a_reason_and_it_is_audited() {
    let cdp = CdpProcess::start();
    let s = seed(&cdp, "crm").await;
    let mut access =
        v1::access_service_client::AccessServiceClient::new(query_as(&cdp, SUPERVISOR_KEY).await);
    let lookup = Some(v1::reveal_field_request::Lookup::CustomerId(
        s.customer_id.clone(),
    ));
    let refused = access
        .reveal_field(v1::RevealFieldRequest {
            lookup: lookup.clone(),
            field: "phone".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("reason"),
        "{}",
        refused.message()
    );
    let shown = access
        .reveal_field(v1::RevealFieldRequest {
            lookup,
            field: "phone".into(),
            reason: "ticket 7: the customer asked for a call back".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.values, vec![format!("+84{}", s.digits)]);
    assert!(shown.hide_at.is_some());
    // "Who viewed my data": the reveal and the agent's earlier reads.
    let mut agent =
        v1::profile_service_client::ProfileServiceClient::new(query_as(&cdp, AGENT_TOKEN).await);
    agent
        .get_profile(v1::GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::CustomerId(
                s.customer_id.clone(),
            )),
            timeline_limit: 1,
            as_of: None,
        })
        .await
        .unwrap();
    let audit = access
        .list_audit(v1::ListAuditRequest {
            customer_id: s.customer_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        audit.entries.iter().any(|e| e.actor == "test-supervisor"
            && e.fields == ["phone"]
            && e.reason.starts_with("ticket 7")
            && !e.client.is_empty()
            && !e.request_id.is_empty()),
        "{audit:?}"
    );
    assert!(
        audit
            .entries
            .iter()
            .any(|e| e.actor == "agent.lan" && e.action == "ProfileService/GetProfile"),
        "{audit:?}"
    );
    // The admin's test reads (another team) are not the supervisor's to see.
    assert!(audit.entries.iter().all(|e| e.team == "hcm"), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_verifies_and_an_altered_copy_does_not() {
    let cdp = CdpProcess::start();
    let s = seed(&cdp, "crm").await;
    let mut agent =
        v1::profile_service_client::ProfileServiceClient::new(query_as(&cdp, AGENT_TOKEN).await);
    for _ in 0..3 {
        agent
            .get_profile(v1::GetProfileRequest {
                lookup: Some(v1::get_profile_request::Lookup::CustomerId(
                    s.customer_id.clone(),
                )),
                timeline_limit: 1,
                as_of: None,
            })
            .await
            .unwrap();
    }
    // A refused call is audited too.
    assert_eq!(
        call(
            cdp.query_addr(),
            Some(AGENT_TOKEN),
            "/cdp.v1.AccessService/ListAudit",
            Shape::Unary
        )
        .await,
        Code::PermissionDenied
    );
    let endpoint = format!("http://{}", cdp.query_addr());
    let cli = |args: &[&str], key: &str| {
        std::process::Command::new(cdp_e2e::cdp_binary())
            .arg("audit")
            .args(args)
            .args(["--endpoint", &endpoint])
            .env("CDP_TOKEN", key)
            .output()
            .unwrap()
    };
    let live = cli(&["verify"], ADMIN_KEY);
    assert!(
        live.status.success(),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    assert!(String::from_utf8_lossy(&live.stdout).contains("intact"));
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("audit.jsonl");
    let out = cli(&["export", "--out", export.to_str().unwrap()], ADMIN_KEY);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records.iter().any(|r| r["entry"]["actor"] == "agent.lan"
            && r["entry"]["outcome"] == "denied"
            && r["entry"]["action"] == "AccessService/ListAudit"),
        "the refused call is not audited"
    );
    let verified = cli(&["verify", "--file", export.to_str().unwrap()], ADMIN_KEY);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // Somebody hides that the agent looked: one record altered in a copy.
    let victim = records
        .iter()
        .position(|r| {
            r["entry"]["actor"] == "agent.lan"
                && r["entry"]["customer_id"] == s.customer_id.as_str()
        })
        .unwrap();
    let mut altered = lines.clone();
    altered[victim] = lines[victim].replace("agent.lan", "nobody");
    let copy = dir.path().join("altered.jsonl");
    std::fs::write(&copy, altered.join("\n")).unwrap();
    let broken = cli(&["verify", "--file", copy.to_str().unwrap()], ADMIN_KEY);
    assert!(!broken.status.success(), "an altered record verified");
    let why = String::from_utf8_lossy(&broken.stderr).into_owned();
    let seq = records[victim]["seq"].as_u64().unwrap();
    assert!(
        why.contains(&format!("record {seq}: its content was altered")),
        "{why}"
    );
    // And one record removed.
    let mut removed = lines.clone();
    removed.remove(victim);
    std::fs::write(&copy, removed.join("\n")).unwrap();
    let broken = cli(&["verify", "--file", copy.to_str().unwrap()], ADMIN_KEY);
    assert!(!broken.status.success(), "a removed record verified");
    // Only admins export the whole chain.
    let refused = cli(&["export", "--out", copy.to_str().unwrap()], SUPERVISOR_KEY);
    assert!(!refused.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_is_bound_to_its_credential_and_cannot_be_borrowed() {
    let cdp = CdpProcess::start();
    let email = format!("{}@shop.vn", unique("src"));
    let mut pos = v1::ingest_service_client::IngestServiceClient::new(
        CdpProcess::connect_as(cdp.addr, Some(POS_INGEST_KEY)).await,
    );
    let named = |source: &str, name: &str| {
        let mut t = touchpoint(
            "Identify",
            "store",
            source,
            vec![id("email", &email)],
            json!({}),
        );
        if let Some(p) = t.personal.as_mut() {
            p.traits = cdp_e2e::to_struct(json!({"name": name}));
        }
        t
    };
    pos.track(v1::TrackRequest {
        touchpoint: Some(named("", "Lan at the till")),
    })
    .await
    .unwrap();
    // Claiming the CRM's source (the most trusted for traits) is refused.
    let spoofed = pos
        .track(v1::TrackRequest {
            touchpoint: Some(named("crm", "Spoofed by the till")),
        })
        .await
        .unwrap_err();
    assert_eq!(spoofed.code(), Code::PermissionDenied);
    assert!(
        spoofed.message().contains("source_id"),
        "{}",
        spoofed.message()
    );
    let batch = pos
        .track_batch(v1::TrackBatchRequest {
            touchpoints: vec![named("pos", "Lan again"), named("crm", "Spoofed again")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((batch.accepted, batch.rejected), (1, 1));
    let refused = &batch.results[1];
    assert_eq!(refused.error_code, "PERMISSION_DENIED");
    assert_eq!(refused.violations[0].field, "source_id");
    let mut profiles = cdp.profiles().await;
    let p = profile_when(&mut profiles, id("email", &email), PATIENCE, |p| {
        metrics(p).events_count == 2
    })
    .await;
    let source = p.trait_sources.iter().find(|t| t.key == "name").unwrap();
    assert_eq!(source.source_id, "pos");
    let traits = cdp_proto::convert::struct_to_json(p.traits.as_ref().unwrap());
    assert_eq!(traits["name"], json!("Lan again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_agent_finds_only_customers_of_its_region() {
    // A store's till (an adapter with its own key, trusted to link).
    let config =
        format!("{DEFAULT_CONFIG}\n[access]\nlabels = {{ \"pos-hcm-01\" = [\"region:south\"] }}\n");
    let cdp = CdpProcess::start_with(&config);
    let south = seed(&cdp, "pos-hcm-01").await;
    let north = seed(&cdp, "pos-hn-01").await;
    let scoped = query_as(&cdp, SCOPED_AGENT_KEY).await;
    let mut profiles = v1::profile_service_client::ProfileServiceClient::new(scoped.clone());
    let get = |c: &str| v1::GetProfileRequest {
        lookup: Some(v1::get_profile_request::Lookup::CustomerId(c.to_owned())),
        timeline_limit: 1,
        as_of: None,
    };
    profiles.get_profile(get(&south.customer_id)).await.unwrap();
    let hidden = profiles
        .get_profile(get(&north.customer_id))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    let missing = profiles
        .get_profile(get(&uuid::Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(
        hidden.message(),
        missing.message(),
        "an out-of-scope customer must look like no customer"
    );
    let by_phone = profiles
        .get_profile(v1::GetProfileRequest {
            lookup: Some(v1::get_profile_request::Lookup::Identifier(id(
                "phone",
                &format!("0{}", north.digits),
            ))),
            timeline_limit: 1,
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(by_phone.code(), Code::NotFound);
    let timeline = profiles
        .list_timeline(v1::ListTimelineRequest {
            lookup: Some(v1::list_timeline_request::Lookup::CustomerId(
                north.customer_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(timeline.code(), Code::NotFound);
    for (who, expect) in [(&south, true), (&north, false)] {
        let found = profiles
            .search_customers(v1::SearchCustomersRequest {
                query: who.email.clone(),
                limit: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            found
                .candidates
                .iter()
                .any(|c| c.customer_id == who.customer_id),
            expect
        );
    }
    let mut identity = v1::identity_service_client::IdentityServiceClient::new(scoped);
    let explained = identity
        .explain(v1::ExplainRequest {
            identifiers: vec![id("email", &north.email)],
        })
        .await
        .unwrap_err();
    assert_eq!(explained.code(), Code::NotFound);
}

/// An analyst restricted to `region:south` (a credential of this test's
/// own configuration).
const SCOPED_ANALYST_KEY: &str = "test-scoped-analyst-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_analyst_lists_previews_and_follows_only_customers_of_its_region() {
    let config = format!(
        "{DEFAULT_CONFIG}\n[access]\nlabels = {{ \"pos-hcm-01\" = [\"region:south\"] }}\n\
         [[credentials]]\nname = \"test-scoped-analyst\"\nrole = \"analyst\"\n\
         key = \"{SCOPED_ANALYST_KEY}\"\nscopes = [\"region:south\"]\n"
    );
    let cdp = CdpProcess::start_with(&config);
    // The northern customer first: on the embedded store the members
    // index lists it first, before the one the scoped analyst may see.
    let north = seed(&cdp, "pos-hn-01").await;
    let south = seed(&cdp, "pos-hcm-01").await;
    let mut analyst =
        v1::audience_service_client::AudienceServiceClient::new(query_as(&cdp, ANALYST_KEY).await);
    let mut scoped = v1::audience_service_client::AudienceServiceClient::new(
        query_as(&cdp, SCOPED_ANALYST_KEY).await,
    );
    let store_customers = v1::Segment {
        name: "store_customers".into(),
        condition: r#""store" in profile.channels"#.into(),
        ..Default::default()
    };
    analyst
        .save_segment(v1::SaveSegmentRequest {
            definition: Some(store_customers.clone()),
        })
        .await
        .unwrap();
    let mut both = vec![south.customer_id.clone(), north.customer_id.clone()];
    both.sort();
    let members = |page: v1::ListMembersResponse| {
        let mut ids: Vec<String> = page.members.into_iter().map(|m| m.customer_id).collect();
        ids.sort();
        ids
    };
    let list = v1::ListMembersRequest {
        segment: "store_customers".into(),
        ..Default::default()
    };
    // The backfill makes both members; the unscoped analyst sees both.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let page = analyst
            .list_members(list.clone())
            .await
            .unwrap()
            .into_inner();
        if members(page) == both {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both customers never listed as members"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scoped
        .list_members(list.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members(page), std::slice::from_ref(&south.customer_id));
    // Page by page: a page reads on past members out of scope, and no
    // cursor names one in clear.
    let mut listed = Vec::new();
    let mut cursor = String::new();
    for page_number in 0.. {
        assert!(page_number < 10, "the pages never end");
        let page = scoped
            .list_members(v1::ListMembersRequest {
                cursor: cursor.clone(),
                limit: 1,
                ..list.clone()
            })
            .await
            .unwrap()
            .into_inner();
        if page_number == 0 {
            assert_eq!(page.members.len(), 1, "{page:?}");
        }
        assert!(!page.next_cursor.contains(&north.customer_id), "{page:?}");
        listed.extend(page.members.into_iter().map(|m| m.customer_id));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(listed, std::slice::from_ref(&south.customer_id));
    let forged = scoped
        .list_members(v1::ListMembersRequest {
            cursor: north.customer_id.clone(),
            ..list.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument, "{forged:?}");

    // The backfill's counts are of every customer: not for a scoped key.
    let backfill = |client: &v1::audience_service_client::AudienceServiceClient<Authed>| {
        let mut client = client.clone();
        async move {
            client
                .get_backfill(v1::GetBackfillRequest::default())
                .await
                .unwrap()
                .into_inner()
        }
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let done = loop {
        let b = backfill(&analyst).await;
        if b.state == "done" {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "{b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(done.changes >= 2, "{done:?}");
    let theirs = backfill(&scoped).await;
    assert_eq!(theirs.state, "done", "{theirs:?}");
    assert_eq!(
        (theirs.scanned, theirs.customers_changed, theirs.changes),
        (0, 0, 0),
        "{theirs:?}"
    );

    // The change records: the scoped analyst reads its region's only.
    let changes = |customer: &str| v1::ListChangesRequest {
        customer_id: customer.into(),
        limit: 1000,
        ..Default::default()
    };
    // (The backfill appends the records after it writes the rows.)
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let all = analyst
            .list_changes(changes(""))
            .await
            .unwrap()
            .into_inner();
        let has = |who: &Seeded| all.changes.iter().any(|c| c.customer_id == who.customer_id);
        if has(&south) && has(&north) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let theirs = scoped.list_changes(changes("")).await.unwrap().into_inner();
    assert!(theirs.at_end, "{theirs:?}");
    assert!(!theirs.changes.is_empty(), "{theirs:?}");
    assert!(
        theirs
            .changes
            .iter()
            .all(|c| c.customer_id == south.customer_id),
        "{theirs:?}"
    );
    let named = scoped
        .list_changes(changes(&north.customer_id))
        .await
        .unwrap()
        .into_inner();
    assert!(named.changes.is_empty(), "{named:?}");

    // A draft previewed over the customers the caller may see.
    let preview = |client: &v1::audience_service_client::AudienceServiceClient<Authed>,
                   sample: u32| {
        let request = v1::PreviewSegmentRequest {
            definition: Some(store_customers.clone()),
            sample,
        };
        let mut client = client.clone();
        async move { client.preview_segment(request).await.unwrap().into_inner() }
    };
    let everyone = preview(&analyst, 0).await;
    assert_eq!(
        (everyone.evaluated, everyone.matched, everyone.complete),
        (2, 2, true),
        "{everyone:?}"
    );
    let region = preview(&scoped, 0).await;
    assert_eq!(
        (region.evaluated, region.matched, region.complete),
        (1, 1, true),
        "{region:?}"
    );
    assert_eq!(region.examples, std::slice::from_ref(&south.customer_id));
    // A sample of one is one customer of the scope, wherever the rows out
    // of it come in the store's order.
    let one = preview(&scoped, 1).await;
    assert_eq!((one.evaluated, one.matched), (1, 1), "{one:?}");
    assert_eq!(one.examples, std::slice::from_ref(&south.customer_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_issued_used_revoked_and_expire() {
    let cdp = CdpProcess::start();
    let mut admin =
        v1::access_service_client::AccessServiceClient::new(query_as(&cdp, ADMIN_KEY).await);
    let bad = admin
        .issue_credential(v1::IssueCredentialRequest {
            name: "x".into(),
            role: "root".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("role"), "{}", bad.message());
    let no_source = admin
        .issue_credential(v1::IssueCredentialRequest {
            name: "till".into(),
            role: "ingest".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        no_source.message().contains("sources"),
        "{}",
        no_source.message()
    );
    // Issued with the CLI, as an operator of the platform would.
    let endpoint = format!("http://{}", cdp.query_addr());
    let out = std::process::Command::new(cdp_e2e::cdp_binary())
        .args([
            "credentials",
            "issue",
            "--name",
            "agent.hoa",
            "--role",
            "agent",
            "--team",
            "hn",
        ])
        .args(["--endpoint", &endpoint])
        .env("CDP_TOKEN", ADMIN_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(key.starts_with("cdp_"), "{key}");
    let listed = admin
        .list_credentials(v1::ListCredentialsRequest {})
        .await
        .unwrap()
        .into_inner();
    let issued = listed
        .credentials
        .iter()
        .find(|c| c.name == "agent.hoa")
        .unwrap()
        .clone();
    assert_eq!(
        (issued.role.as_str(), issued.origin.as_str()),
        ("agent", "issued")
    );
    assert!(
        !format!("{listed:?}").contains(&key),
        "a listed key shows its secret"
    );
    // Every process knows it at once (the others read the credentials topic).
    let who = |key: String| {
        let addr = cdp.query_addr();
        async move {
            let mut c = v1::access_service_client::AccessServiceClient::new(
                CdpProcess::connect_as(addr, Some(&key)).await,
            );
            c.who_am_i(v1::WhoAmIRequest {}).await
        }
    };
    let me = who(key.clone()).await.unwrap().into_inner();
    assert_eq!(
        (me.name.as_str(), me.role.as_str(), me.team.as_str()),
        ("agent.hoa", "agent", "hn")
    );
    assert_eq!(
        call(
            cdp.addr,
            Some(&key),
            "/cdp.v1.DeadLetterService/ListDeadLetters",
            Shape::Unary
        )
        .await,
        Code::PermissionDenied
    );
    admin
        .revoke_credential(v1::RevokeCredentialRequest {
            id: issued.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        who(key.clone()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Other processes stop accepting it within their refresh (2 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // An agent's key at ingest: refused for its role while it is
        // valid, unknown once revoked.
        let code = call(
            cdp.addr,
            Some(&key),
            "/cdp.v1.DeadLetterService/ListDeadLetters",
            Shape::Unary,
        )
        .await;
        if code == Code::Unauthenticated {
            break;
        }
        assert_eq!(code, Code::PermissionDenied);
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepted at ingest: {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A configured key cannot be revoked over the API.
    let config_key = admin
        .revoke_credential(v1::RevokeCredentialRequest {
            id: "config:test-admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(config_key.code(), Code::FailedPrecondition);
    // A key with a short life stops working when it ends.
    let short = admin
        .issue_credential(v1::IssueCredentialRequest {
            name: "temp".into(),
            role: "operator".into(),
            expires_in_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    who(short.secret.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = who(short.secret).await.unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_failed_sign_ins_are_rate_limited_and_unusual_reading_alerts() {
    let mut cdp = CdpProcess::start();
    let mut customers = Vec::new();
    for _ in 0..3 {
        customers.push(seed(&cdp, "crm").await.customer_id);
    }
    // Tight limits from here on (the seeding above read as the admin).
    cdp.restart_with(&format!(
        "{DEFAULT_CONFIG}\n[access]\nreads_per_minute = 5\nfailed_logins_per_minute = 3\nalert_reads_per_hour = 2\n"
    ));
    // A kill loses the folds not yet synced; they are folded again from the
    // log after the restart. Wait for them as the admin (its own limit).
    let mut admin = cdp.profiles().await;
    for c in &customers {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while admin
            .get_profile(v1::GetProfileRequest {
                lookup: Some(v1::get_profile_request::Lookup::CustomerId(c.clone())),
                timeline_limit: 1,
                as_of: None,
            })
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{c} is not back after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut agent =
        v1::profile_service_client::ProfileServiceClient::new(query_as(&cdp, AGENT_TOKEN).await);
    let mut codes = Vec::new();
    for i in 0..7 {
        let c = &customers[i % customers.len()];
        codes.push(
            match agent
                .get_profile(v1::GetProfileRequest {
                    lookup: Some(v1::get_profile_request::Lookup::CustomerId(c.clone())),
                    timeline_limit: 1,
                    as_of: None,
                })
                .await
            {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            },
        );
    }
    assert_eq!(&codes[..5], &[Code::Ok; 5], "{codes:?}");
    assert_eq!(codes[6], Code::ResourceExhausted, "{codes:?}");
    // Three customers in an hour is above this configuration's usual two.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cdp.log().contains("unusual number of profiles read") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no alert: {}",
            cdp.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The console: after three wrong keys, this address waits.
    let http = reqwest::Client::new();
    let login = |key: &'static str| {
        let http = http.clone();
        let url = format!("{}/api/login", cdp.console_url());
        async move {
            http.post(url)
                .json(&json!({"token": key}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for _ in 0..3 {
        assert_eq!(login("wrong-key-123").await, 401);
    }
    assert_eq!(login("wrong-key-123").await, 429);
    assert_eq!(login(AGENT_TOKEN).await, 429, "a right key waits too");
}

#[test]
fn demo_keys_are_refused_on_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../cdp.example.toml");
    let out = std::process::Command::new(cdp_e2e::cdp_binary())
        .args([
            "dev",
            "--config",
            example,
            "--grpc-addr",
            "0.0.0.0:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        why.contains("access.secret") || why.contains("demo secret"),
        "{why}"
    );
}
