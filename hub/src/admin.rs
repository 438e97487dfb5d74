//! The hub's admin HTTP endpoint: `/healthz`, `/metrics`, `/fleet`, `/export`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::server::Hub;

/// The router.
///
/// Without `serve_export`, `/export` answers 403: stored records are served only on
/// loopback unless `admin.export_on_network` says otherwise.
pub fn router(hub: Arc<Hub>, serve_export: bool) -> Router {
    let r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/fleet", get(fleet));
    let r = if serve_export {
        r.route("/export", get(export))
    } else {
        r.route(
            "/export",
            get(|| async {
                (
                    StatusCode::FORBIDDEN,
                    "/export is off: admin.listen is not on loopback; set admin.export_on_network = true to serve \
                     stored records there\n",
                )
            }),
        )
    };
    r.with_state(hub)
}

async fn metrics(State(h): State<Arc<Hub>>) -> Response {
    {
        let fleet = h.fleet.lock().expect("fleet lock");
        for state in ["connected", "disconnected"] {
            let n = fleet.values().filter(|e| e.state == state).count();
            h.metrics.gateways.get_or_create(&crate::metrics::StateLabel { state: state.into() }).set(n as i64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], h.metrics.encode()).into_response()
}

async fn fleet(State(h): State<Arc<Hub>>) -> Response {
    let mut v: Vec<_> = h.fleet.lock().expect("fleet lock").values().cloned().collect();
    v.sort_by(|a, b| a.gateway.cmp(&b.gateway));
    Json(v).into_response()
}

/// Filters of `/export`.
#[derive(Debug, serde::Deserialize)]
pub struct ExportQuery {
    gateway: Option<String>,
    lane: Option<String>,
}

async fn export(State(h): State<Arc<Hub>>, Query(q): Query<ExportQuery>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let sink = h.sink.clone();
    tokio::spawn(async move { sink.export_ndjson(q.gateway, q.lane, tx).await });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}
