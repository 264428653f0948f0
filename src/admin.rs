//! The admin HTTP endpoint: `/metrics` (Prometheus text format),
//! `/healthz` (the process is up) and `/readyz` (an issuer has keys and the
//! upstream answers). Bind it to loopback or a private network only.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::listener::ProxyHandle;

/// Histogram buckets for latencies, in seconds.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];
/// Histogram buckets for session durations, in seconds.
const SESSION_BUCKETS_SECONDS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 14_400.0,
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("rlsproxy_session_duration_seconds".into()),
                    SESSION_BUCKETS_SECONDS,
                )
                .and_then(|b| b.set_buckets(LATENCY_BUCKETS_SECONDS));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder is already installed; metrics
            // then go there and this handle renders nothing.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    proxy: ProxyHandle,
    metrics: PrometheusHandle,
}

/// The admin router; serve it with `axum::serve`.
pub fn router(proxy: ProxyHandle) -> Router {
    let state = AdminState {
        proxy,
        metrics: metrics_handle(),
    };
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, proxy: ProxyHandle) -> std::io::Result<()> {
    axum::serve(listener, router(proxy)).await
}

async fn metrics_text(State(state): State<AdminState>) -> String {
    metrics::gauge!("rlsproxy_client_connections_admitted").set(state.proxy.clients() as f64);
    state.metrics.run_upkeep();
    state.metrics.render()
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.proxy.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
