//! Embedding the engine in your own axum application: the KServe v2 routes of
//! `apparate serve` ([`apparate::server::Server::router`]) next to a route of your own. (For
//! the gRPC form, run [`apparate::server::Server::serve_grpc`] on a second listener; for
//! decoders, build the server with `Server::with_generators`.)
//!
//! ```sh
//! weights/fetch.sh && tools/train-ramps.sh
//! cargo run --release --example server -- 127.0.0.1:8080
//! curl -d '{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["what a lovely day"]}]}' \
//!     http://127.0.0.1:8080/v2/models/sentiment/infer
//! curl http://127.0.0.1:8080/hello
//! ```

use std::sync::Arc;

use apparate::serve::Engine;
use apparate::server::{Model, Server, ServerConfig};
use axum::routing::get;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let engine = Engine::builder("weights/minilm-l6-sentiment.apparate")
        .ramps("weights/minilm-l6-sentiment.ramps")
        .profile("weights/minilm-l6-sentiment.profile.json")
        .build()?;
    let server = Server::new(
        vec![Model {
            name: "sentiment".into(),
            engine: Arc::new(engine),
            default_timeout: None,
        }],
        ServerConfig::default(),
    );
    let app = server
        .router()
        .route("/hello", get(|| async { "hello from your own route\n" }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
