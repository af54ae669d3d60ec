//! The generation engine (continuous batching) with SmolLM2-135M on the CPU: sequences batched
//! together, joining and leaving between steps, prompts fed in chunks, give the same greedy
//! tokens as the reference (the fixture of tests/llama_engine.rs); cancellation frees the
//! cache at once; a full queue and an oversized request are refused with errors that say so;
//! stopping the engine ends every stream.

mod common;

use std::time::{Duration, Instant};

use apparate::generation::{
    Engine, EngineConfig, FinishReason, GenerateRequest, LanguageModel, TokenEvent,
};
use apparate::models::llama::{KvCacheConfig, Sampling};
use apparate::serve::ServeError;

fn model() -> LanguageModel<apparate::backend::CpuBackend> {
    LanguageModel::open_gguf(
        common::cpu(),
        common::weights_file("smollm2-135m-instruct.q4_1.gguf"),
    )
    .unwrap()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        sampling: Sampling::default(),
        stop: Vec::new(),
    }
}

/// Eight prompts at once with different lengths to generate (so sequences leave while others
/// run), prompts fed in chunks of at most 24 tokens per step: every sequence's tokens are the
/// reference's greedy tokens.
#[test]
fn batched_sequences_generate_the_reference_tokens() {
    let f = common::smollm2_fixture();
    let tm = model();
    let engine = Engine::start(
        tm.model,
        EngineConfig {
            max_step_tokens: 24,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let cases: Vec<usize> = (0..8).collect();
    let t0 = Instant::now();
    let streams: Vec<_> = cases
        .iter()
        .map(|&i| {
            let c = &f["cases"][i];
            let n = 8 + 3 * i;
            (
                i,
                n,
                engine.submit(greedy(common::u32s(&c["ids"]), n)).unwrap(),
            )
        })
        .collect();
    for (i, n, s) in streams {
        let (ids, why, stats) = s.collect_tokens().unwrap();
        let want = common::u32s(&f["cases"][i]["greedy"]);
        assert_eq!(ids, want[..n], "case {i}");
        assert_eq!(why, FinishReason::Length);
        assert_eq!(stats.generated, n);
        assert!(stats.time_to_first_token <= stats.total);
    }
    let st = engine.stats();
    eprintln!("{st:?} in {:.1} s", t0.elapsed().as_secs_f64());
    assert!(st.max_running_seen >= 4, "{st:?}");
    assert!(
        st.decode_rows > st.steps,
        "decode rows were batched: {st:?}"
    );
    assert_eq!(st.completed, 8);
    // The engine records the free blocks at the end of its loop: wait for it.
    let t0 = Instant::now();
    loop {
        let st = engine.stats();
        if st.free_blocks == st.cache_blocks {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "blocks not returned: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Dropping a stream cancels its generation and its blocks return to the cache before the
/// next step; a stop token ends a generation with `Stop`.
#[test]
fn cancellation_frees_the_cache_and_stop_tokens_end() {
    let f = common::smollm2_fixture();
    let tm = model();
    let engine = Engine::start(tm.model, EngineConfig::default()).unwrap();
    let ids = common::u32s(&f["cases"][0]["ids"]);
    let mut s = engine.submit(greedy(ids.clone(), 500)).unwrap();
    for _ in 0..3 {
        assert!(matches!(s.next(), Some(TokenEvent::Token(_))));
    }
    assert!(engine.stats().free_blocks < engine.stats().cache_blocks);
    drop(s);
    let t0 = Instant::now();
    loop {
        let st = engine.stats();
        if st.cancelled == 1 && st.free_blocks == st.cache_blocks {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "not freed: {st:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The reference's third greedy token as a stop token: three tokens, then Stop.
    let want = common::u32s(&f["cases"][0]["greedy"]);
    let mut req = greedy(ids, 50);
    req.stop = vec![want[2]];
    let (got, why, _) = engine.submit(req).unwrap().collect_tokens().unwrap();
    assert_eq!(got, want[..3]);
    assert_eq!(why, FinishReason::Stop);
}

/// A cache for about one sequence and no queue: a second request while the first runs is
/// refused as overloaded (the first is not evicted and finishes); a request larger than the
/// whole cache, an empty prompt and a bad temperature are refused at submission.
#[test]
fn a_full_cache_refuses_new_sequences_without_evicting() {
    let f = common::smollm2_fixture();
    let tm = model();
    // 30 layers x 2 x 16 positions x 192 values x 4 bytes = 737,280 bytes a block.
    let engine = Engine::start(
        tm.model,
        EngineConfig {
            queue_capacity: 0,
            kv: KvCacheConfig {
                block_size: 16,
                budget_bytes: 6 * 737_280,
            },
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert_eq!(engine.cache_capacity(), 96);
    let ids = common::u32s(&f["cases"][0]["ids"]);
    let first = engine.submit(greedy(ids.clone(), 40)).unwrap();
    let mut first = first.peekable();
    assert!(matches!(first.peek(), Some(TokenEvent::Token(_))));
    let second = engine.submit(greedy(ids.clone(), 40)).unwrap();
    match second.collect_tokens() {
        Err(ServeError::Overloaded(why)) => assert!(why.contains("cache blocks free"), "{why}"),
        other => panic!("expected overloaded, got {other:?}"),
    }
    let n = first.filter(|e| matches!(e, TokenEvent::Token(_))).count();
    assert_eq!(n, 40, "the running sequence finished");
    match engine.submit(greedy(ids.clone(), 100)) {
        Err(ServeError::BadInput(why)) => assert!(why.contains("cache holds 96"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted a request larger than the cache"),
    }
    assert!(matches!(
        engine.submit(greedy(Vec::new(), 5)),
        Err(ServeError::BadInput(_))
    ));
    let mut bad = greedy(ids, 5);
    bad.sampling.temperature = -1.0;
    assert!(matches!(engine.submit(bad), Err(ServeError::BadInput(_))));
}

/// Stopping the engine ends a running stream with a ShutDown error instead of hanging.
#[test]
fn stopping_the_engine_ends_every_stream() {
    let f = common::smollm2_fixture();
    let tm = model();
    let engine = Engine::start(tm.model, EngineConfig::default()).unwrap();
    let mut s = engine
        .submit(greedy(common::u32s(&f["cases"][1]["ids"]), 1000))
        .unwrap();
    assert!(matches!(s.next(), Some(TokenEvent::Token(_))));
    drop(engine);
    let last = s.last().unwrap();
    assert!(
        matches!(last, TokenEvent::Failed(ServeError::ShutDown(_))),
        "{last:?}"
    );
}

/// Sampling with a seed repeats; the text stream turns tokens into the reference's text.
#[test]
fn seeded_sampling_repeats_and_text_streams() {
    let f = common::smollm2_fixture();
    let tm = model();
    let mut text = tm.text_stream();
    let want = common::u32s(&f["cases"][0]["greedy"]);
    let mut out = String::new();
    for &t in &want[..10] {
        out.push_str(&text.push(t).unwrap());
    }
    let expect = tm.tokenizer.decode(&want[..10], true).unwrap();
    assert_eq!(out, expect);
    let engine = Engine::start(tm.model, EngineConfig::default()).unwrap();
    let run = |seed| {
        let mut r = greedy(common::u32s(&f["cases"][2]["ids"]), 12);
        r.sampling = Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed,
        };
        engine.submit(r).unwrap().collect_tokens().unwrap().0
    };
    assert_eq!(run(3), run(3));
}

/// The async stream (what `apparate serve` reads): the reference's greedy tokens, awaited with
/// no thread blocked on them, beside a blocking stream in the same batches; dropping it
/// cancels its sequence.
#[test]
fn async_streams_give_the_reference_tokens_and_cancel_on_drop() {
    let f = common::smollm2_fixture();
    let engine = Engine::start(model().model, EngineConfig::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prompt = |i: usize| common::u32s(&f["cases"][i]["ids"]);
    let blocking = engine.submit(greedy(prompt(1), 12)).unwrap();
    let (ids, why) = rt.block_on(async {
        let mut s = engine.submit_async(greedy(prompt(0), 12)).unwrap();
        let mut ids = Vec::new();
        loop {
            match s.next().await.unwrap() {
                TokenEvent::Token(t) => ids.push(t),
                TokenEvent::Done(why, _) => {
                    assert!(s.next().await.is_none(), "nothing after Done");
                    return (ids, why);
                }
                TokenEvent::Failed(e) => panic!("{e}"),
            }
        }
    });
    assert_eq!(ids, common::u32s(&f["cases"][0]["greedy"])[..12]);
    assert_eq!(why, FinishReason::Length);
    let (other, _, _) = blocking.collect_tokens().unwrap();
    assert_eq!(other, common::u32s(&f["cases"][1]["greedy"])[..12]);

    // A long generation dropped after its first token is cancelled.
    rt.block_on(async {
        let mut s = engine.submit_async(greedy(prompt(2), 500)).unwrap();
        assert!(matches!(s.next().await, Some(TokenEvent::Token(_))));
    });
    let t0 = Instant::now();
    while engine.stats().cancelled == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
