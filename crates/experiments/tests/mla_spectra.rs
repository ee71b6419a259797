//! The seed-000 pipeline: C4-format data, tokenizers and packing, the download path against a
//! server on 127.0.0.1, the training loop's exact resumption, and the whole command on a
//! micro model.

use attn_models::{AttentionConfig, AttentionVariant, LlamaConfig};
use burn::backend::{Autodiff, NdArray};
use experiments::data::{Corpus, Split, write_c4_shard};
use experiments::mla_spectra::{self, DataSource, Options};
use experiments::tokens::{self, SequenceOrder};
use experiments::train::{RunSpec, TrainConfig, latest_checkpoint, train};
use probe::{ProbeConfig, Schedule};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

type B = Autodiff<NdArray<f32>>;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("experiments-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// burn's ndarray backend has one global RNG (`Backend::seed`): tests that initialise models
/// take this lock, so that a parallel test cannot draw from the stream between a seed and
/// the initialisation it is meant to fix.
static BACKEND_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    BACKEND_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deterministic English-like documents with learnable structure.
fn documents(n: usize) -> Vec<String> {
    let subjects = [
        "the model",
        "a layer",
        "the spectrum",
        "each head",
        "the bulk",
    ];
    let verbs = ["shows", "keeps", "loses", "gains", "spreads"];
    let objects = [
        "an outlier",
        "its rank",
        "the gap",
        "some energy",
        "a spike",
    ];
    (0..n)
        .map(|i| {
            (0..6)
                .map(|j| {
                    let k = i * 7 + j * 3;
                    format!(
                        "{} {} {}.",
                        subjects[k % 5],
                        verbs[(k / 5) % 5],
                        objects[(k / 25) % 5]
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn c4_shards_are_read_split_and_checked() {
    let dir = temp("c4");
    let docs = documents(30);
    for (i, chunk) in docs.chunks(10).enumerate() {
        write_c4_shard(
            &dir.join(format!("c4-train.{i:05}-of-00003.json.gz")),
            chunk,
        )
        .unwrap();
    }
    let corpus = Corpus::open(&dir, 7).unwrap();
    assert_eq!(corpus.train.len(), 2);
    assert_eq!(corpus.validation.len(), 1, "the last shard validates");
    let train_docs = corpus.documents(Split::Train).unwrap();
    let valid_docs = corpus.documents(Split::Validation).unwrap();
    assert_eq!((train_docs.len(), valid_docs.len()), (20, 10));
    assert_eq!(valid_docs, docs[20..].to_vec());
    // The shard order depends on the seed, the documents do not.
    let mut all = train_docs.clone();
    all.sort();
    let mut expect = docs[..20].to_vec();
    expect.sort();
    assert_eq!(all, expect);

    // One file: every 20th document validates.
    let single = temp("c4-single");
    write_c4_shard(&single.join("one.json.gz"), &documents(40)).unwrap();
    let c = Corpus::open(&single, 0).unwrap();
    assert_eq!(c.documents(Split::Validation).unwrap().len(), 2);
    assert_eq!(c.documents(Split::Train).unwrap().len(), 38);

    // Plain text: blank-line-separated blocks.
    let text = temp("text");
    std::fs::write(text.join("a.txt"), "one\nline\n\ntwo\n\n\nthree\n").unwrap();
    let c = Corpus::open(&text.join("a.txt"), 0).unwrap();
    assert_eq!(
        c.documents(Split::Train).unwrap(),
        vec!["one\nline\n", "two\n", "three\n"]
    );

    // Corrupt gzip, a line without `text`, no files: one clear error each.
    let bad = temp("bad");
    let mut bytes = std::fs::read(dir.join("c4-train.00000-of-00003.json.gz")).unwrap();
    let n = bytes.len();
    bytes.truncate(n / 2);
    std::fs::write(bad.join("c4-train.00000-of-00001.json.gz"), bytes).unwrap();
    let e = Corpus::open(&bad, 0)
        .unwrap()
        .documents(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("c4-train.00000-of-00001.json.gz"), "{e}");
    std::fs::write(bad.join("c4-train.00000-of-00001.json.gz"), b"").unwrap();
    std::fs::write(
        bad.join("x.jsonl"),
        "{\"text\": \"fine\"}\n{\"url\": \"no text\"}\n",
    )
    .unwrap();
    let e = Corpus::open(&bad.join("x.jsonl"), 0)
        .unwrap()
        .documents(Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("text"), "{e}");
    let empty = temp("empty");
    assert!(Corpus::open(&empty, 0).is_err());
    assert!(Corpus::open(&empty.join("missing"), 0).is_err());
}

#[test]
fn bpe_packing_and_the_seeded_order() {
    let docs = documents(50);
    let tok = tokens::train_bpe(&docs, 300).unwrap();
    let vocab = tok.get_vocab_size(true);
    assert!(vocab <= 300 && vocab > 257, "{vocab}");
    let eot = tokens::end_of_text(&tok).unwrap();
    let packed = tokens::pack(&tok, &docs, 8, vocab).unwrap();
    assert_eq!(packed.window, 9);
    assert_eq!(packed.tokens.len() % 9, 0);
    assert!(packed.tokens.iter().filter(|&&t| t == eot).count() >= docs.len() - 1);
    // Round trip of the first document through the tokenizer.
    let first: Vec<u32> = packed
        .tokens
        .iter()
        .copied()
        .take_while(|&t| t != eot)
        .collect();
    assert_eq!(tok.decode(&first, true).unwrap(), docs[0]);
    // A model vocabulary smaller than the tokenizer's is an error, not a silent clamp.
    assert!(tokens::pack(&tok, &docs, 8, 100).is_err());
    assert!(tokens::train_bpe(&docs, 100).is_err());
    // The order: a pure function of (seed, step), a permutation per epoch.
    let mut a = SequenceOrder::new(10, 3);
    let mut b = SequenceOrder::new(10, 3);
    let first_epoch: Vec<usize> = (0..10).map(|i| a.at(i)).collect();
    let mut sorted = first_epoch.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_eq!(b.batch(7, 3), a.batch(7, 3));
    assert_ne!(SequenceOrder::new(10, 4).batch(0, 10), first_epoch);
}

fn micro(variant: AttentionVariant, vocab: usize) -> LlamaConfig {
    let attention = AttentionConfig::new(32, 2, 16, variant)
        .with_rope_dim(8)
        .with_max_seq_len(64);
    LlamaConfig::new(vocab, 2, attention, 64, 16)
}

fn micro_train(steps: u64) -> TrainConfig {
    let mut t = mla_spectra::preset_train("tiny").unwrap();
    t.steps = steps;
    t.batch = 4;
    t.accumulation = 2;
    t.lr = 5e-3;
    t.warmup = 2;
    t.eval_every = 5;
    t.eval_batches = 2;
    t.checkpoint_every = 4;
    t.clip_norm = Some(1.0);
    t
}

/// A run killed between two checkpoints and resumed writes exactly the metrics of an
/// uninterrupted run (byte for byte), and its validation loss falls. The killed run reads its
/// scalars every 3 updates, the uninterrupted one every update: the metric files must not
/// depend on `read_every` (rows of earlier updates before a probe's, clipping on the device).
#[test]
fn a_killed_run_resumes_without_losing_or_repeating_a_row() {
    let _rng = rng_lock();
    let docs = documents(80);
    let tok = tokens::train_bpe(&docs, 300).unwrap();
    let vocab = tok.get_vocab_size(true);
    let data = tokens::pack(&tok, &docs[..70], 16, vocab).unwrap();
    let valid = tokens::pack(&tok, &docs[70..], 16, vocab).unwrap();
    let model = micro(AttentionVariant::MlaDecoupled, vocab);
    let config = micro_train(15);
    let mut probe = ProbeConfig::new("test", "mla-decoupled", Schedule::every(3));
    probe.queue = 1;
    let dir_a = temp("resume-a");
    let dir_b = temp("resume-b");
    let every_third = TrainConfig {
        read_every: 3,
        ..config.clone()
    };
    let run = |dir: &Path, kill_at: Option<u64>| {
        let spec = RunSpec {
            model: &model,
            train: if dir == dir_a { &config } else { &every_third },
            probe: probe.clone(),
            train_data: &data,
            validation_data: &valid,
            dir,
            initial: None,
            phase_timing: false,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train::<B>(&spec, &Default::default(), |p| {
                if Some(p.step) == kill_at {
                    panic!("killed at step {}", p.step);
                }
            })
        }))
    };
    run(&dir_a, None).unwrap().unwrap();
    assert!(run(&dir_b, Some(7)).is_err(), "the kill");
    let (ckpt, state) = latest_checkpoint(&dir_b).unwrap().unwrap();
    assert_eq!(state.step, 4, "{}", ckpt.display());
    let resumed = run(&dir_b, None).unwrap().unwrap();
    assert_eq!(resumed.steps_run, 11);
    for file in ["metrics.csv", "metrics.jsonl"] {
        let a = std::fs::read(dir_a.join(file)).unwrap();
        let b = std::fs::read(dir_b.join(file)).unwrap();
        assert!(a.len() > 1000);
        assert!(a == b, "{file} differs ({} vs {} bytes)", a.len(), b.len());
    }
    // A finished run is not trained again.
    assert_eq!(run(&dir_b, None).unwrap().unwrap().steps_run, 0);
    let rows = probe::read_jsonl(&dir_a.join("metrics.jsonl")).unwrap();
    let val: Vec<f64> = rows
        .iter()
        .filter(|r| r.space == "validation")
        .map(|r| r.value)
        .collect();
    assert_eq!(val.len(), 4, "steps 0, 5, 10, 15");
    assert!(val[3] < val[0] - 0.5, "validation loss falls: {val:?}");
    let probed: std::collections::BTreeSet<u64> = rows
        .iter()
        .filter(|r| r.space == "weight")
        .map(|r| r.step)
        .collect();
    assert_eq!(
        probed.into_iter().collect::<Vec<_>>(),
        vec![0, 3, 6, 9, 12, 15]
    );
    // A corrupt checkpoint is a clear error.
    let (ckpt, _) = latest_checkpoint(&dir_a).unwrap().unwrap();
    let state_path = ckpt.join("state.json");
    let mut s = std::fs::read_to_string(&state_path).unwrap();
    s = s.replace("\"finished\": true", "\"finished\": false");
    std::fs::write(&state_path, s).unwrap();
    std::fs::write(ckpt.join("model.bin"), b"garbage").unwrap();
    let e = run(&dir_a, None).unwrap().unwrap_err().to_string();
    assert!(e.contains("corrupt checkpoint"), "{e}");
}

/// `RunSpec::initial`: training from an export of the very weights the seeded initialisation
/// draws gives the same losses bit for bit (the export round-trips exactly); other weights
/// give another trajectory; an export of another model is refused.
#[test]
fn training_starts_from_exported_weights() {
    use burn::tensor::backend::Backend;
    type Inner = NdArray<f32>;
    let _rng = rng_lock();
    let docs = documents(40);
    let tok = tokens::train_bpe(&docs, 300).unwrap();
    let vocab = tok.get_vocab_size(true);
    let data = tokens::pack(&tok, &docs[..35], 16, vocab).unwrap();
    let valid = tokens::pack(&tok, &docs[35..], 16, vocab).unwrap();
    let model = micro(AttentionVariant::MlaPreRope, vocab);
    let mut config = micro_train(4);
    config.accumulation = 1;
    config.read_every = 1;
    let never = Schedule::never();
    let export = |seed: u64, name: &str| {
        let dir = temp(name);
        Inner::seed(&Default::default(), seed);
        let m = model.init::<Inner>(&Default::default()).unwrap();
        attn_models::export::save(&m, &model, &dir).unwrap();
        dir
    };
    let same = export(config.seed, "initial-same");
    let other = export(config.seed + 1, "initial-other");
    let run = |initial: Option<&Path>, spec_model: &LlamaConfig, phase_timing: bool| {
        let dir = temp("initial-run");
        let spec = RunSpec {
            model: spec_model,
            train: &config,
            probe: ProbeConfig::new("test", "mla-prerope", never.clone()),
            train_data: &data,
            validation_data: &valid,
            dir: &dir,
            initial,
            phase_timing,
        };
        let mut out = Vec::new();
        train::<B>(&spec, &Default::default(), |p| out.push(p)).map(|_| out)
    };
    let losses = |initial: Option<&Path>, spec_model: &LlamaConfig| {
        run(initial, spec_model, false)
            .map(|progress| progress.into_iter().map(|p| p.loss).collect::<Vec<_>>())
    };
    let seeded = losses(None, &model).unwrap();
    assert_eq!(seeded.len(), 4);
    assert_eq!(losses(Some(&same), &model).unwrap(), seeded);
    // Phase timing: every update reports its phases (none without it), they fit inside the
    // update's wall time (one update per read), and the waits change no loss.
    assert!(
        run(Some(&same), &model, false)
            .unwrap()
            .iter()
            .all(|p| p.phases.is_none())
    );
    let timed = run(Some(&same), &model, true).unwrap();
    assert_eq!(timed.iter().map(|p| p.loss).collect::<Vec<_>>(), seeded);
    for p in &timed {
        let t = p.phases.expect("phases with phase_timing");
        let parts = [t.forward, t.backward, t.norm, t.optimizer, t.device_wait];
        assert!(parts.iter().all(|x| x.is_finite() && *x >= 0.0), "{t:?}");
        assert!(t.forward > 0.0 && t.backward > 0.0, "{t:?}");
        assert!(t.update() <= p.seconds, "{t:?} within {} s", p.seconds);
    }
    let moved = losses(Some(&other), &model).unwrap();
    assert!(moved[0] != seeded[0], "{moved:?} vs {seeded:?}");
    let wider = micro(AttentionVariant::Mha, vocab);
    let e = losses(Some(&same), &wider).unwrap_err().to_string();
    assert!(e.contains("different model"), "{e}");
}

/// The whole command on a micro model: data, tokenizer, three variants, figures, report;
/// and a run directory that holds a different configuration is refused.
#[test]
fn the_command_writes_metrics_figures_and_report() {
    let _rng = rng_lock();
    let dir = temp("command");
    let corpus = dir.join("corpus");
    write_c4_shard(
        &corpus.join("c4-train.00000-of-00002.json.gz"),
        &documents(60),
    )
    .unwrap();
    write_c4_shard(
        &corpus.join("c4-validation.00000-of-00001.json.gz"),
        &documents(10),
    )
    .unwrap();
    let mut options = Options::tiny();
    options.data = DataSource::Path(corpus.clone());
    options.steps = Some(6);
    let mut config = options.resolve().unwrap();
    config.vocab_size = 300;
    config.model = micro(AttentionVariant::Mha, 0);
    config.train.batch = 4;
    config.schedule = Schedule::every(3);
    let out = dir.join("run");
    assert!(!mla_spectra::open_run_dir(&config, &out).unwrap());
    mla_spectra::run::<B>(&config, &out, &Default::default(), "cpu", |_, _, _| {}).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "report.md",
        "report.html",
        "figures/mp_gap.svg",
        "figures/mp_gap.png",
        "figures/outlier_count.svg",
        "figures/outlier_energy.svg",
        "figures/mp_soft_rank.svg",
        "figures/stable_rank.svg",
        "figures/heatmap_mp_gap_mla-decoupled.svg",
        "figures/heatmap_stable_rank_mha.png",
        "figures/heatmap_entropy_mla-prerope.svg",
        "figures/violin_outlier_energy.svg",
        "figures/attn_gap.svg",
        "figures/loss.svg",
        "mha/metrics.csv",
        "mla-prerope/metrics.jsonl",
        "mla-decoupled/model/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("MP-Gap: MHA > PreRoPE > Decoupled"),
        "{report}"
    );
    assert!(report.contains("6 steps"));
    // Same configuration: resumes (nothing to do); different: refused.
    assert!(mla_spectra::open_run_dir(&config, &out).unwrap());
    config.train.lr *= 2.0;
    let e = mla_spectra::open_run_dir(&config, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
}

/// A one-connection-at-a-time HTTP server on 127.0.0.1 that serves `body` for any path,
/// honouring `Range: bytes=N-`; returns its base URL and a log of the Range headers seen.
fn serve(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let start = request.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("range: bytes=")
                    .map(|r| r.trim_end_matches('-').trim().parse::<usize>().unwrap_or(0))
            });
            log2.lock().unwrap().push(format!("{start:?}"));
            let (status, slice) = match start {
                Some(s) => ("206 Partial Content", &body[s.min(body.len())..]),
                None => ("200 OK", &body[..]),
            };
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                slice.len()
            );
            if let Some(s) = start {
                head += &format!(
                    "Content-Range: bytes {s}-{}/{}\r\n",
                    body.len() - 1,
                    body.len()
                );
            }
            head += "\r\n";
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(slice);
        }
    });
    (url, log)
}

/// `--data c4`'s download path against a local server: fetch and verify, resume a partial
/// file with a Range request, reject a corrupt shard, and say "offline" when nothing listens.
#[test]
fn c4_download_resumes_verifies_and_reports_offline() {
    use experiments::download::{fetch, train_shard};
    let dir = temp("download");
    let shard = dir.join("source.json.gz");
    write_c4_shard(&shard, &documents(200)).unwrap();
    let body = std::fs::read(&shard).unwrap();
    let (url, log) = serve(body.clone());
    let name = train_shard(0);
    let cache = dir.join("cache");
    fetch(&url, std::slice::from_ref(&name), &cache, true).unwrap();
    assert_eq!(std::fs::read(cache.join(&name)).unwrap(), body);
    // Resume: a partial file of the first half.
    let cache2 = dir.join("cache2");
    std::fs::create_dir_all(&cache2).unwrap();
    std::fs::write(cache2.join(format!("{name}.part")), &body[..body.len() / 2]).unwrap();
    fetch(&url, std::slice::from_ref(&name), &cache2, true).unwrap();
    assert_eq!(std::fs::read(cache2.join(&name)).unwrap(), body);
    assert!(
        log.lock()
            .unwrap()
            .contains(&format!("Some({})", body.len() / 2))
    );
    // Corrupt content is rejected and removed.
    let (bad_url, _) = serve(b"not gzip at all".to_vec());
    let cache3 = dir.join("cache3");
    let e = fetch(&bad_url, std::slice::from_ref(&name), &cache3, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid C4"), "{e}");
    assert!(!cache3.join(&name).exists() && !cache3.join(format!("{name}.part")).exists());
    // Nothing listening: the offline message naming `--data PATH`.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = fetch(
        &format!("http://127.0.0.1:{port}"),
        &[name],
        &dir.join("cache4"),
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("offline") && e.contains("--data PATH"), "{e}");
}
