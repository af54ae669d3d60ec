//! A small HTTP server around the engine: `POST /classify` with a text body answers JSON,
//! `GET /metrics` answers the Prometheus text. One thread per connection, the blocking API;
//! under an async runtime `engine.infer(input).await` does the same without blocking.
//!
//! ```sh
//! weights/fetch.sh && tools/train-ramps.sh
//! cargo run --release --example server -- 127.0.0.1:8080
//! curl -d 'what a lovely day' http://127.0.0.1:8080/classify
//! curl http://127.0.0.1:8080/metrics
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use apparate::serve::{Engine, Exit, Input};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let engine = Arc::new(
        Engine::builder("weights/minilm-l6-sentiment.apparate")
            .ramps("weights/minilm-l6-sentiment.ramps")
            .profile("weights/minilm-l6-sentiment.profile.json")
            .log(|s| eprintln!("{s}"))
            .build()?,
    );
    let listener = TcpListener::bind(&addr)?;
    eprintln!("listening on http://{addr} ({})", engine.device());
    for stream in listener.incoming() {
        let engine = engine.clone();
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            if let Err(e) = handle(&engine, stream) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}

fn handle(engine: &Engine, mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let (status, body) = match request_line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
        ["GET", "/metrics"] => ("200 OK", engine.metrics().render_prometheus()),
        ["POST", "/classify"] => {
            let mut text = vec![0u8; length.min(1 << 20)];
            reader.read_exact(&mut text)?;
            let text = String::from_utf8_lossy(&text).into_owned();
            match engine.infer_blocking(Input::Text(text)) {
                Ok(r) => {
                    let exit = match &r.exit {
                        Exit::Ramp { point, .. } => point.clone(),
                        Exit::Final => "final".into(),
                    };
                    let json = serde_json::json!({
                        "label": r.label,
                        "confidence": r.confidence,
                        "exit": exit,
                        "ms": r.timings.total.as_secs_f64() * 1e3,
                    });
                    ("200 OK", format!("{json}\n"))
                }
                // Overloaded, deadline, bad input, backend failure: say which.
                Err(e) => (
                    "503 Service Unavailable",
                    format!("{}\n", serde_json::json!({ "error": e.to_string() })),
                ),
            }
        }
        _ => (
            "404 Not Found",
            "try POST /classify or GET /metrics\n".into(),
        ),
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
