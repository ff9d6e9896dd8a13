//! The billing messages that the door and the pool publish, in dCache 12's shapes.

use super::*;

pub(super) fn now() -> String {
    let offset = time::UtcOffset::from_hms(2, 0, 0).expect("offset");
    iso_offset_date_time(OffsetDateTime::now_utc().to_offset(offset))
}

pub(super) fn session_id() -> String {
    format!(
        "{}:{}",
        uuid::Uuid::new_v4().simple(),
        OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000
    )
}

pub(super) fn principal(
    identity: &Identity,
    peer: SocketAddr,
) -> (u32, Vec<String>, Option<String>) {
    let ip = peer.ip().to_string();
    match identity {
        Identity::Cert(dn) => (
            3915,
            vec![
                "UidPrincipal[3915]".into(),
                "GidPrincipal[239,primary]".into(),
                "UserNamePrincipal[jdoe]".into(),
                format!("Origin[{ip}]"),
                format!("GlobusPrincipal[{dn}]"),
            ],
            Some(dn.clone()),
        ),
        Identity::Token => (
            3915,
            vec![
                "UidPrincipal[3915]".into(),
                "GidPrincipal[239,primary]".into(),
                "UserNamePrincipal[jdoe]".into(),
                format!("Origin[{ip}]"),
                "OidcSubjectPrincipal[jdoe@https://sim.example.org]".into(),
            ],
            // Without a DN, dCache's owner is the user name (DoorRequestInfoMessage;
            // dCache 12.0.1 wrote "owner":"admin" for a macaroon of admin).
            Some("jdoe".into()),
        ),
    }
}

pub(super) fn door_common(
    state: &State,
    kind: &str,
    peer: SocketAddr,
    path: &str,
    subject: &[String],
    uid: u32,
    owner: Option<String>,
) -> Msg {
    let ip = peer.ip().to_string();
    Msg::default()
        .put("VERSION", "1.0")
        .put("msgType", kind)
        .put("date", now())
        .put("queuingTime", 0)
        .put("cellName", DOOR_CELL)
        .put("cellType", "door")
        .put("cellDomain", DOOR_DOMAIN)
        .put(
            "session",
            format!("door:{DOOR_CELL}@{DOOR_DOMAIN}:{}", session_id()),
        )
        .put("transferPath", format!("{}{}", state.cfg.root, path))
        .put("subject", subject)
        .put("client", &ip)
        .put("clientChain", &ip)
        .put("mappedUID", uid)
        .put("mappedGID", 239)
        .put("owner", owner)
}

/// The pool's `transfer` message (first) and its `moverInfo` form for the door (second).
pub(super) fn pool_transfer(
    meta: &FileMeta,
    billing_path: &str,
    transfer_path: &str,
    elapsed: Duration,
    direction: &str,
) -> (Msg, Msg) {
    let ms = elapsed.as_millis().max(1) as u64;
    let bandwidth = meta.size as f64 / elapsed.as_secs_f64().max(1e-3);
    let session = format!("pool:{POOL_CELL}@{POOL_DOMAIN}:{}", session_id());
    let protocol = serde_json::json!({"protocol":"Https","versionMajor":1,"versionMinor":1,"transferTag":"","port":53412,"host":"127.0.0.1"});
    let (bw, idle, active) = if direction == "read" {
        ("meanReadBandwidth", "readIdle", "readActive")
    } else {
        ("meanWriteBandwidth", "writeIdle", "writeActive")
    };
    let common = |m: Msg| {
        m.put("version", "1.0")
            .put("msgType", "transfer")
            .put("date", now())
            .put("queuingTime", 0)
            .put("cellName", POOL_CELL)
            .put("cellType", "pool")
            .put("cellDomain", POOL_DOMAIN)
            .put_double(bw, bandwidth)
            .put(idle, "PT0.004S")
            .put(active, format!("PT{}.{:03}S", ms / 1000, ms % 1000))
            .put("localEndpoint", "127.0.0.1:24125")
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("session", &session)
            .put("transferSize", meta.size)
            .put("transferTime", ms)
            .put("isWrite", direction)
            .put("protocolInfo", &protocol)
            .put("isP2p", false)
            .put("transferPath", transfer_path)
    };
    let full_msg = common(Msg::default())
        .put(
            "subject",
            ["UidPrincipal[3915]", "GidPrincipal[239,primary]"],
        )
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", billing_path)
        .put("fileSize", meta.size)
        .put("storageInfo", "disk:sim@osm")
        .put(
            "initiator",
            format!("door:{DOOR_CELL}@{DOOR_DOMAIN}:{}", session_id()),
        );
    (full_msg, common(Msg::default()))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn door_request(
    state: &State,
    identity: &Identity,
    peer: SocketAddr,
    path: &str,
    meta: Option<&FileMeta>,
    code: i64,
    msg: &str,
    mover: Option<Msg>,
) -> Msg {
    let (uid, subject, owner) = principal(identity, peer);
    let known = state.files.lock().expect("lock").get(path).cloned();
    let meta = meta.cloned().or(known);
    let mut m = door_common(state, "request", peer, path, &subject, uid, owner)
        .put("sessionDuration", 692)
        .put("status", serde_json::json!({"code": code, "msg": msg}))
        .put("billingPath", format!("{}{}", state.cfg.root, path))
        .put("storageInfo", "disk:sim@osm")
        .put("fileSize", meta.as_ref().map(|m| m.size).unwrap_or(0));
    if let Some(meta) = &meta {
        m = m.put("pnfsid", &meta.pnfsid);
    }
    if let Some(mover) = mover {
        m = m.put_msg("moverInfo", mover);
    }
    m
}

pub(super) fn srm_put_done(meta: &FileMeta, billing_path: &str, transfer_path: &str) -> Msg {
    Msg::default()
        .put("VERSION", "1.0")
        .put("msgType", "request")
        .put("date", now())
        .put("queuingTime", 0)
        .put("cellName", "SrmManager")
        .put("cellType", "door")
        .put("cellDomain", "srmmanagerDomain")
        .put("status", serde_json::json!({"code": 0, "msg": ""}))
        .put(
            "session",
            format!("srm2:putDone:-{}", rand::random::<u32>() >> 1),
        )
        .put("sessionDuration", 0)
        .put("transferPath", transfer_path)
        .put(
            "subject",
            ["UidPrincipal[3915]", "GidPrincipal[239,primary]"],
        )
        .put("client", "127.0.0.1")
        .put("clientChain", "unknown")
        .put("mappedUID", 3915)
        .put("mappedGID", 239)
        .put("pnfsid", &meta.pnfsid)
        .put("billingPath", billing_path)
        .put("fileSize", meta.size)
        .put("storageInfo", "disk:sim@osm")
}

/// One message of background billing traffic, in the fixtures' shapes.
pub(super) fn background_message(root: &str, i: usize) -> Msg {
    let pnfsid = format!("0000{}", uuid::Uuid::new_v4().simple()).to_ascii_uppercase();
    let path = format!("{root}/other/run{}/file-{i}.dat", i % 17);
    let size = 1_000_000 + (i as u64 * 7919) % 100_000_000;
    let pool = |kind: &str| {
        Msg::default()
            .put("version", "1.0")
            .put("msgType", kind)
            .put("date", now())
            .put("queuingTime", 0)
            .put("cellName", POOL_CELL)
            .put("cellType", "pool")
            .put("cellDomain", POOL_DOMAIN)
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("pnfsid", &pnfsid)
            .put("billingPath", &path)
            .put("fileSize", size)
            .put("storageInfo", "disk:sim@osm")
    };
    let mover = |m: Msg, direction: &str, p2p: bool| {
        m.put_double("meanReadBandwidth", 2.3981544E8)
            .put("readIdle", "PT0.021S")
            .put("readActive", "PT0.5S")
            .put("transferSize", size)
            .put("transferTime", 641)
            .put("isWrite", direction)
            .put("isP2p", p2p)
            .put("transferPath", &path)
            .put("protocolInfo", serde_json::json!({"protocol": if p2p {"Http"} else {"Https"}, "versionMajor":1,"versionMinor":1,"transferTag":"","port":53988,"host":"127.0.0.1"}))
    };
    match i % 6 {
        0 => mover(pool("transfer"), "read", false).put("subject", ["UidPrincipal[3915]"]),
        1 => mover(pool("transfer"), "write", true).put("subject", ["UidPrincipal[0]"]),
        2 => pool("store")
            .put("transferTime", 48211)
            .put("hsm", serde_json::json!({"type":"osm","instance":"hpss","provider":"script"}))
            .put("locations", ["osm://hpss/?store=sim&group=disk&bfid=0000000000001A2B3C4D"]),
        3 => Msg::default()
            .put("version", "1.0")
            .put("msgType", "hit")
            .put("date", now())
            .put("cellName", POOL_CELL)
            .put("cellType", "pool")
            .put("cellDomain", POOL_DOMAIN)
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("pnfsid", &pnfsid)
            .put("filesize", size)
            .put("billingPath", &path)
            .put("cached", true),
        4 => pool("remove").put("billingPath", "Unknown"),
        _ => Msg::default()
            .put("VERSION", "1.0")
            .put("msgType", "request")
            .put("date", now())
            .put("cellName", DOOR_CELL)
            .put("cellType", "door")
            .put("cellDomain", DOOR_DOMAIN)
            .put("status", serde_json::json!({"code": 0, "msg": ""}))
            .put("pnfsid", &pnfsid)
            .put("billingPath", &path)
            .put("transferPath", &path)
            .put("fileSize", size)
            .put("moverInfo", serde_json::json!({"version":"1.0","msgType":"transfer","cellType":"pool","isWrite":"read","isP2p":false,"status":{"code":0,"msg":""}})),
    }
}
