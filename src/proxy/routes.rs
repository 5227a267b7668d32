//! Route table (§3): method + path pattern → required scope; first match wins. Sits after
//! authentication in the pipeline; the matched pattern is also the `route` metric label.

use std::sync::{Arc, OnceLock};

use http::Method;
use prometheus::Histogram;

use crate::config::{Config, RouteRule, RouteSpec};
use crate::error::Error;
use crate::metrics::Metrics;

/// Who answers a matched request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// Forwarded to the upstream.
    Upstream,
    /// Served by tollgate itself: the key-management API of §6.
    Keys,
    /// Served by tollgate itself to any valid key, without admission: `GET /v1/limits` (§13).
    Limits,
    /// The key dashboard's page and assets (§13): no key, no limits.
    Dashboard,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// The whole path.
    Exact(String),
    /// `prefix/*`: the prefix, a slash, and at least one more character.
    Under(String),
    /// Any path (the REST table's catch-all).
    Any,
}

impl Pattern {
    fn parse(p: &str) -> Pattern {
        match p {
            "/*" => Pattern::Any,
            _ => match p.strip_suffix("/*") {
                Some(prefix) => Pattern::Under(format!("{prefix}/")),
                None => Pattern::Exact(p.to_string()),
            },
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Pattern::Exact(p) => p == path,
            Pattern::Under(prefix) => path.len() > prefix.len() && path.starts_with(prefix.as_str()),
            Pattern::Any => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    method: Option<Method>,
    pattern: Pattern,
    /// The scope a key needs for this route.
    pub scope: Arc<str>,
    /// The pattern as written: the `route` metric label and the access-log field.
    pub label: Arc<str>,
    pub handler: Handler,
    /// A public route (`public: true` in config): no key, no scope, no rate limit.
    pub public: bool,
    /// Its duration histograms, each resolved when first observed rather than by label on
    /// every request (two label lookups, ≈ 300 instructions per request: `benches/load/
    /// profile.sh h1`), so that a route never forwarded has no upstream series. A table
    /// belongs to one `State`'s snapshot (built per config generation), so to one registry.
    request_duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
}

impl Route {
    fn new(method: Option<Method>, path: &str, scope: &str, handler: Handler) -> Route {
        Route {
            method,
            pattern: Pattern::parse(path),
            scope: scope.into(),
            label: path.into(),
            handler,
            public: false,
            request_duration: OnceLock::new(),
            upstream_duration: OnceLock::new(),
        }
    }

    /// This route's `tollgate_request_duration_seconds` in `metrics` (the registry of the
    /// state whose snapshot holds the route).
    pub fn request_duration(&self, metrics: &Metrics) -> &Histogram {
        self.request_duration.get_or_init(|| metrics.request_duration(&self.label))
    }

    /// This route's `tollgate_upstream_duration_seconds`, likewise.
    pub fn upstream_duration(&self, metrics: &Metrics) -> &Histogram {
        self.upstream_duration.get_or_init(|| metrics.upstream_duration(&self.label))
    }

    /// Passes when the key's scope set contains this route's scope, exactly.
    pub fn check<'a>(&self, scopes: impl IntoIterator<Item = &'a str> + Clone) -> Result<(), Error> {
        if scopes.clone().into_iter().any(|s| s == &*self.scope) {
            Ok(())
        } else {
            Err(Error::Forbidden {
                required: self.scope.to_string(),
                current: scopes.into_iter().map(str::to_string).collect(),
            })
        }
    }
}

/// The label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Used for unmatched requests when `default_scope` is set.
    fallback: Option<Route>,
}

impl RouteTable {
    /// The table of a config: its route spec, `default_scope` and `dashboard.enabled`.
    pub fn from_config(config: &Config) -> RouteTable {
        RouteTable::build(&config.routes, config.default_scope.as_deref(), config.dashboard.enabled)
    }

    /// A table with the dashboard on (its default).
    pub fn new(spec: &RouteSpec, default_scope: Option<&str>) -> RouteTable {
        RouteTable::build(spec, default_scope, true)
    }

    fn build(spec: &RouteSpec, default_scope: Option<&str>, dashboard: bool) -> RouteTable {
        // tollgate's own routes come first in every table, so that a custom list can neither
        // shadow nor weaken them: the key API always needs `admin:keys`; `/v1/limits` needs a
        // valid key and no scope (it is the caller's own information); the dashboard needs
        // nothing (the page is public, its API calls carry the key). They take any method: the
        // handlers answer 404 to the ones they do not serve, rather than a REST table's
        // catch-all forwarding them upstream.
        let mut routes = vec![
            Route::new(None, "/v1/keys", "admin:keys", Handler::Keys),
            Route::new(None, "/v1/keys/*", "admin:keys", Handler::Keys),
            Route::new(None, "/v1/limits", "", Handler::Limits),
        ];
        if dashboard {
            for p in ["/dashboard", "/dashboard/*"] {
                let mut route = Route::new(None, p, "", Handler::Dashboard);
                route.public = true;
                routes.push(route);
            }
        }
        match spec {
            RouteSpec::OpenAi => {
                for p in ["/v1/models", "/v1/models/*"] {
                    routes.push(Route::new(Some(Method::GET), p, "inference:read", Handler::Upstream));
                }
                for p in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"] {
                    routes.push(Route::new(Some(Method::POST), p, "inference:write", Handler::Upstream));
                }
            }
            RouteSpec::Rest => {
                routes.push(Route::new(Some(Method::GET), "/*", "read", Handler::Upstream));
                routes.push(Route::new(Some(Method::HEAD), "/*", "read", Handler::Upstream));
                routes.push(Route::new(None, "/*", "write", Handler::Upstream));
            }
            RouteSpec::List(rules) => {
                for RouteRule { method, path, scope } in rules {
                    let mut route =
                        Route::new(method.clone(), path, scope.as_deref().unwrap_or(""), Handler::Upstream);
                    route.public = scope.is_none();
                    routes.push(route);
                }
            }
        }
        let fallback = default_scope.map(|s| Route::new(None, "/*", s, Handler::Upstream)).map(|mut r| {
            r.label = "default".into();
            r
        });
        RouteTable { routes, fallback }
    }

    /// The first route matching method and path; `None` is answered 404 by the caller.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.method.as_ref().is_none_or(|m| m == method) && r.pattern.matches(path))
            .or(self.fallback.as_ref())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(&RouteSpec::OpenAi, None)
    }

    #[test]
    fn builtin_table() {
        let t = table();
        let label = |m: Method, p: &str| t.find(&m, p).map(|r| (r.label.to_string(), r.scope.to_string()));
        assert_eq!(label(Method::GET, "/v1/models"), Some(("/v1/models".into(), "inference:read".into())));
        assert_eq!(
            label(Method::GET, "/v1/models/gpt-x"),
            Some(("/v1/models/*".into(), "inference:read".into()))
        );
        assert_eq!(label(Method::GET, "/v1/models/"), None);
        assert_eq!(label(Method::POST, "/v1/models"), None);
        assert_eq!(
            label(Method::POST, "/v1/chat/completions"),
            Some(("/v1/chat/completions".into(), "inference:write".into()))
        );
        assert_eq!(label(Method::GET, "/v1/chat/completions"), None);
        assert_eq!(label(Method::DELETE, "/v1/keys/abc").map(|l| l.1), Some("admin:keys".into()));
        assert_eq!(t.find(&Method::GET, "/v1/keys").unwrap().handler, Handler::Keys);
        assert_eq!(label(Method::GET, "/v1/modelsX"), None);
    }

    #[test]
    fn rest_table_and_default_scope() {
        let t = RouteTable::new(&RouteSpec::Rest, None);
        assert_eq!(&*t.find(&Method::GET, "/anything").unwrap().scope, "read");
        assert_eq!(&*t.find(&Method::HEAD, "/anything").unwrap().scope, "read");
        assert_eq!(&*t.find(&Method::PATCH, "/anything").unwrap().scope, "write");
        assert_eq!(&*t.find(&Method::GET, "/v1/keys").unwrap().scope, "admin:keys");

        let t = RouteTable::new(&RouteSpec::OpenAi, Some("inference:read"));
        let r = t.find(&Method::GET, "/health").unwrap();
        assert_eq!((&*r.label, &*r.scope), ("default", "inference:read"));
    }

    #[test]
    fn own_routes_come_first_in_every_table() {
        let list = RouteSpec::List(vec![RouteRule {
            method: None,
            path: "/*".into(),
            scope: Some("anything".into()),
        }]);
        for spec in [RouteSpec::OpenAi, RouteSpec::Rest, list] {
            let t = RouteTable::new(&spec, Some("inference:read"));
            assert_eq!(t.find(&Method::GET, "/v1/limits").unwrap().handler, Handler::Limits);
            assert_eq!(t.find(&Method::POST, "/v1/keys/x/rotate").unwrap().handler, Handler::Keys);
            for p in ["/dashboard", "/dashboard/app.js"] {
                let r = t.find(&Method::GET, p).unwrap();
                assert_eq!((r.handler, r.public), (Handler::Dashboard, true), "{p}");
            }
            let off = RouteTable::build(&spec, None, false);
            assert!(off.find(&Method::GET, "/dashboard").is_none_or(|r| r.handler != Handler::Dashboard));
            assert_eq!(off.find(&Method::GET, "/v1/limits").unwrap().handler, Handler::Limits);
        }
        assert!(table().find(&Method::GET, "/dashboardX").is_none());
    }

    #[test]
    fn scope_check_is_exact() {
        let t = table();
        let r = t.find(&Method::POST, "/v1/embeddings").unwrap();
        assert!(r.check(["inference:write"]).is_ok());
        let e = r.check(["inference:read", "inference:writer"]).unwrap_err();
        assert_eq!(
            e,
            Error::Forbidden {
                required: "inference:write".into(),
                current: vec!["inference:read".into(), "inference:writer".into()]
            }
        );
    }
}
