//! The key-management HTTP API (§6), served by tollgate itself on the public listener for keys
//! with the `admin:keys` scope (checked by the route table before this runs). Every operation is
//! confined to the caller's organisation; a key of another organisation is "not found".

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Principal;
use crate::body::Body;
use crate::config::parse_duration;
use crate::error::Error;
use crate::keys::lifecycle::{self, Actor, ManageError, NewKeySpec};
use crate::keys::KeyRecord;
use crate::state::{Snapshot, State};

/// Management requests are small; anything bigger is a mistake or an attack.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// Absent: the config's `default_scopes`.
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    workspace: Option<String>,
    #[serde(default)]
    expires_in: Option<String>,
}

/// `POST /v1/keys/{id}/rotate` takes no body, or new scopes for the new key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

impl From<ManageError> for Error {
    fn from(e: ManageError) -> Error {
        match e {
            ManageError::NotFound(id) => Error::KeyNotFound(id),
            ManageError::Invalid(msg) => Error::BadRequest(msg),
            ManageError::Internal(detail) => {
                tracing::error!(error = %detail, "key API: internal error");
                Error::Internal(
                    "The key could not be created because of a server error; it has been logged.".into(),
                )
            }
            ManageError::ScopeNotHeld { scope, held } => Error::Forbidden { required: scope, current: held },
            ManageError::ScopeNotAllowed { scope, tier, allowed } => {
                Error::ScopeNotAllowed { scope, tier, allowed }
            }
            ManageError::TierNotHeld { tier, held } => Error::TierForbidden { tier, current: held },
            ManageError::OutlivesActor => Error::ExpiryForbidden,
            ManageError::Store(e) => {
                tracing::error!(error = %e, "key store error in the key API");
                Error::Unavailable("The key store is unreachable; try again shortly.")
            }
        }
    }
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Responses may carry a plaintext key: never cache them.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn with_key(snap: &Snapshot, record: &KeyRecord, token: &crate::keys::Token) -> serde_json::Value {
    let mut v = view(snap, record);
    v["key"] = json!(token.expose());
    v
}

/// A key as the API shows it: with `restorable_until`, which the dashboard tells its user.
fn view(snap: &Snapshot, record: &KeyRecord) -> serde_json::Value {
    record.to_json_with(snap.config.auth.revocation_retention)
}

/// Serves one `/v1/keys…` request.
pub async fn handle(
    state: &State,
    snap: &Snapshot,
    caller: &Principal,
    req: Request<Incoming>,
) -> Result<Response<Body>, Error> {
    let store = state.auth.store().as_ref();
    let org = Some(&*caller.org);
    let actor = Actor::Key {
        id: &caller.key_id,
        org: &caller.org,
        tier: &caller.tier,
        scopes: &caller.scopes,
        expires_at: caller.expires_at,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/v1/keys").unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let not_found = || Error::NotFound { method: method.to_string(), path: path.clone() };
    match (&method, segments.as_slice()) {
        (&Method::GET, []) => {
            let keys = store.list(org).await.map_err(ManageError::from)?;
            let data: Vec<_> = keys.iter().map(|k| view(snap, k)).collect();
            Ok(json_response(StatusCode::OK, json!({ "object": "list", "data": data })))
        }
        (&Method::POST, []) => {
            let body = read_json::<CreateBody>(req).await?;
            let spec = create_spec(snap, caller, body)?;
            let (record, token) = lifecycle::create(store, &snap.config, spec, &actor, None).await?;
            // Nothing is cached for a key that did not exist: the poll need not evict anything.
            state.auth.note_change(&record.id, record.created_at);
            Ok(json_response(StatusCode::CREATED, with_key(snap, &record, &token)))
        }
        (&Method::GET, [id]) => {
            let r = lifecycle::fetch(store, id, org).await?;
            Ok(json_response(StatusCode::OK, view(snap, &r)))
        }
        (&Method::GET, [id, "audit"]) => {
            lifecycle::fetch(store, id, org).await?;
            let events = store.audit(id).await.map_err(ManageError::from)?;
            let data: Vec<_> = events.iter().map(|e| e.to_json()).collect();
            Ok(json_response(StatusCode::OK, json!({ "object": "list", "data": data })))
        }
        (&Method::POST, [id, "revoke"]) => {
            let (r, changed) = lifecycle::revoke(store, id, &actor).await?;
            // Immediate on this instance (§2): the next request with this key is refused, even
            // when another instance or the CLI revoked it first and no poll has seen that yet.
            match changed {
                Some(at) => {
                    state.auth.apply_change(id, at);
                }
                None => state.auth.invalidate(id),
            }
            Ok(json_response(StatusCode::OK, view(snap, &r)))
        }
        (&Method::POST, [id, "restore"]) => {
            let (r, at) = lifecycle::restore(store, &snap.config, id, &actor).await?;
            state.auth.apply_change(id, at);
            Ok(json_response(StatusCode::OK, view(snap, &r)))
        }
        (&Method::POST, [id, "rotate"]) => {
            let body = read_optional_json::<RotateBody>(req).await?.unwrap_or_default();
            let (record, token) = lifecycle::rotate(store, &snap.config, id, &actor, body.scopes).await?;
            state.auth.note_change(&record.id, record.created_at);
            Ok(json_response(StatusCode::CREATED, with_key(snap, &record, &token)))
        }
        _ => Err(not_found()),
    }
}

/// The new key's spec: the caller's organisation, its tier unless another is asked for (which
/// `lifecycle::create` then refuses with 403, as it refuses scopes the caller lacks: the API must
/// not be a way to escalate privileges).
fn create_spec(snap: &Snapshot, caller: &Principal, body: CreateBody) -> Result<NewKeySpec, Error> {
    let scopes = match &body.scopes {
        // Empty: `lifecycle::create` gives the config's `default_scopes`.
        None => Vec::new(),
        // Given but empty is refused ("at least one scope"), not taken for the defaults.
        Some(s) => crate::keys::normalize_scopes(s.iter().map(String::as_str)).map_err(Error::BadRequest)?,
    };
    let expires_in = match &body.expires_in {
        None => None,
        Some(s) => Some(parse_duration(s).map_err(|e| Error::BadRequest(format!("expires_in: {e}")))?),
    };
    let workspace = body.workspace.or_else(|| Some(caller.workspace.clone()));
    if snap.config.auth.workspace.is_some() && workspace != snap.config.auth.workspace {
        return Err(Error::BadRequest(
            "workspace: this deployment only accepts keys of its own workspace".into(),
        ));
    }
    Ok(NewKeySpec {
        org: caller.org.to_string(),
        tier: body.tier.unwrap_or_else(|| caller.tier.clone()),
        scopes,
        name: body.name,
        workspace,
        expires_in,
    })
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Error> {
    Ok(Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| Error::PayloadTooLarge { limit: MAX_BODY as u64 })?
        .to_bytes())
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Error> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadRequest(format!("Invalid JSON body: {e}")))
}

/// A JSON body that may also be absent (empty): rotate was bodiless before it took scopes.
async fn read_optional_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<Option<T>, Error> {
    let bytes = read_body(req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::BadRequest(format!("Invalid JSON body: {e}")))
}
