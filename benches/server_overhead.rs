//! What the HTTP layer of `apparate serve` adds to a request's latency: the same texts sent
//! one at a time (closed loop, light load) to the engine directly and through the server over
//! a kept-alive loopback connection, interleaved in rounds; p50/p90/p99 of both and of the
//! difference of the medians. Not the load test of the server issue (that needs a load tool).
//!
//! ```sh
//! cargo bench --bench server_overhead -- [--requests 400] [--rounds 4] [--threads N]
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apparate::select::BackendChoice;
use apparate::serve::{Engine, Input};
use apparate::server::{Model, Server, ServerConfig};

const MODEL: &str = "weights/minilm-l6-sentiment.apparate";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// One request over a kept-alive connection; returns the response body.
fn roundtrip(r: &mut BufReader<TcpStream>, body: &str) -> String {
    let req = format!(
        "POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    r.get_mut().write_all(req.as_bytes()).unwrap();
    let mut len = 0usize;
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.contains(" 200 "), "{status}");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).unwrap();
    String::from_utf8(b).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |n: &str| {
        args.iter()
            .position(|a| a == n)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>().expect("a count"))
    };
    let requests = flag("--requests").unwrap_or(400);
    let rounds = flag("--rounds").unwrap_or(4);
    let threads = flag("--threads");
    let texts: Vec<String> = std::fs::read_to_string("README.md")
        .expect("run from the repository root")
        .lines()
        .filter(|l| l.len() > 40)
        .take(requests)
        .map(str::to_string)
        .collect();
    let engine = Arc::new(
        Engine::builder(MODEL)
            .backend(BackendChoice::Cpu { threads })
            .build()
            .expect("the sentiment model (weights/fetch.sh)"),
    );
    let server = Server::new(
        vec![Model {
            name: "m".into(),
            engine: engine.clone(),
            default_timeout: None,
        }],
        ServerConfig::default(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { server.serve(listener, std::future::pending()).await });
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut conn = BufReader::new(stream);
    let bodies: Vec<String> = texts
        .iter()
        .map(|t| {
            serde_json::json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}]})
                .to_string()
        })
        .collect();
    // Warm-up.
    for (t, b) in texts.iter().zip(&bodies).take(20) {
        engine.infer_blocking(Input::Text(t.clone())).unwrap();
        roundtrip(&mut conn, b);
    }
    let (mut direct, mut http) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (t, b) in texts.iter().zip(&bodies) {
            let t0 = Instant::now();
            engine.infer_blocking(Input::Text(t.clone())).unwrap();
            direct.push(t0.elapsed().as_secs_f64() * 1e3);
            let t0 = Instant::now();
            roundtrip(&mut conn, b);
            http.push(t0.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    println!(
        "{} requests each, {} ({}), one at a time",
        direct.len(),
        MODEL,
        engine.device()
    );
    for (name, v) in [
        ("engine directly", &mut direct),
        ("through HTTP", &mut http),
    ] {
        println!(
            "{name:>16}: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99)
        );
    }
    println!(
        "HTTP adds: {:.3} ms at p50, {:.3} ms at p99",
        pct(&mut http, 0.5) - pct(&mut direct, 0.5),
        pct(&mut http, 0.99) - pct(&mut direct, 0.99)
    );
}
