//! End-to-end: `xtask diagnose` on checkpoints the test writes itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn xtask() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
}

/// `xtask diagnose ARGS`'s standard output, once it has succeeded.
fn diagnose_ok<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    let out = xtask().arg("diagnose").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn write_bf16(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| {
            v.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}

/// A 3-layer LLaMA-style checkpoint (d = 64, 4 heads of 16) with config.json beside it.
fn llama_checkpoint(dir: &Path) -> PathBuf {
    let d = 64;
    let mut tensors = Vec::new();
    for layer in 0..3 {
        for (i, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            tensors.push((
                format!("model.layers.{layer}.self_attn.{name}.weight"),
                vec![d, d],
                values(d * d, (layer * 10 + i) as u64),
            ));
        }
    }
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![100, d],
        values(100 * d, 99),
    ));
    let path = dir.join("model.safetensors");
    write_bf16(&path, &tensors);
    std::fs::write(
        dir.join("config.json"),
        r#"{"num_attention_heads": 4, "hidden_size": 64}"#,
    )
    .unwrap();
    path
}

#[test]
fn csv_has_the_documented_header_and_rows() {
    let dir = temp_dir("csv");
    let path = llama_checkpoint(&dir);
    let text = diagnose_ok([path.to_str().unwrap(), "--format", "csv", "--per-head"]);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("layer,head,estimator,null,metric,value"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // 3 layers × (whole + 4 heads) × 11 metrics, default pair only.
    assert_eq!(rows.len(), 3 * 5 * 11);
    for r in &rows {
        assert_eq!(r.len(), 6);
        assert_eq!((r[2], r[3]), ("empirical", "mp"));
        let v: f64 = r[5].parse().unwrap();
        assert!(v.is_finite() || r[4].starts_with("tw_"), "{r:?}");
    }
    for metric in [
        "lambda_max",
        "lambda_plus",
        "sigma2",
        "mp_gap",
        "outlier_count",
        "outlier_energy",
        "mp_soft_rank",
        "stable_rank",
        "normalized_stable_rank",
    ] {
        assert!(
            rows.iter()
                .any(|r| r[0] == "0" && r[1] == "all" && r[4] == metric),
            "{metric}"
        );
    }
    assert!(rows.iter().any(|r| r[1] == "3"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn json_and_table_formats_and_extra_estimators() {
    let dir = temp_dir("json");
    let path = llama_checkpoint(&dir);
    let json = diagnose_ok([
        path.to_str().unwrap(),
        "--format",
        "json",
        "--estimators",
        "empirical,trimmed",
        "--nulls",
        "mp,product",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let layers = v.as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(
        (
            &layers[2]["layer"],
            &layers[2]["stack"],
            &layers[2]["precision"]
        ),
        (&2.into(), &"model.layers".into(), &"f32".into())
    );
    assert_eq!(
        layers[0]["diagnostics"]["layer"]["diagnoses"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let out = xtask()
        .args(["diagnose", path.to_str().unwrap(), "--layers", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_one_clear_line_and_a_failure_code() {
    let dir = temp_dir("bad");
    let path = llama_checkpoint(&dir);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![dir.join("missing.safetensors").to_string_lossy().into()],
            "No such file",
        ),
        (
            vec![path.to_string_lossy().into(), "--heads".into(), "5".into()],
            "not a multiple of 5 heads",
        ),
        (
            vec![
                path.to_string_lossy().into(),
                "--estimators".into(),
                "magic".into(),
            ],
            "estimator",
        ),
        (
            vec![path.to_string_lossy().into(), "--layers".into(), "7".into()],
            "layer 7",
        ),
        (
            vec![
                path.to_string_lossy().into(),
                "--stack".into(),
                "vision".into(),
            ],
            "no attention stack `vision.N` (stacks: model.layers.N (3 layers))",
        ),
    ];
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"definitely not a safetensors file").unwrap();
    let mut cases = cases;
    cases.push((
        vec![junk.to_string_lossy().into()],
        "not a valid safetensors file",
    ));
    for (args, needle) in cases {
        let out = xtask().arg("diagnose").args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        // Found before anything is printed (the layers' shapes are checked first).
        assert!(out.stdout.is_empty(), "{args:?} printed before failing");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--precision f64` computes in float64: the same outlier counts here, λ₁ within float32's
/// rounding (1e-5 relative leaves a wide margin over ≈ 1e-7).
#[test]
fn float64_gives_the_float32_values_to_their_rounding() {
    let dir = temp_dir("precision");
    let path = llama_checkpoint(&dir);
    let rows = |precision: &str| {
        let path = path.to_str().unwrap();
        diagnose_ok(["--format", "csv", "--precision", precision, path])
            .lines()
            .skip(1)
            .map(|l| {
                let (key, value) = l.rsplit_once(',').unwrap();
                (key.to_string(), value.parse::<f64>().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let (single, double) = (rows("f32"), rows("f64"));
    assert_eq!(single.len(), double.len());
    for ((key, a), (key_b, b)) in single.iter().zip(&double) {
        assert_eq!(key, key_b);
        if key.ends_with("outlier_count") {
            assert_eq!(a, b, "{key}");
        } else if key.ends_with("lambda_max") {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{key}: {a} vs {b}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--stack` names a stack by what comes before `.N.`; the only stack is read without it.
/// A vision-language checkpoint's head counts come from the config.json section whose layer
/// count and width are the stack's, and the run says which.
#[test]
fn a_stack_is_chosen_by_its_prefix() {
    let dir = temp_dir("stack");
    let path = llama_checkpoint(&dir);
    let run = |extra: &[&str]| {
        let path = path.to_str().unwrap();
        diagnose_ok(
            ["--format", "csv", "--layers", "1", path]
                .iter()
                .chain(extra),
        )
    };
    assert_eq!(run(&["--stack", "model.layers"]), run(&[]));
    // Two stacks: the language model's (3 layers, d = 64, 4 heads) and a vision tower's
    // (2 layers, d = 32, 2 heads); the head counts only in text_config and vision_config.
    let vlm = temp_dir("stack-vlm");
    let mut tensors = Vec::new();
    for (stack, layers, d) in [
        ("model.language_model", 3, 64),
        ("model.vision_tower", 2, 32),
    ] {
        for layer in 0..layers {
            for (i, name) in ["q_proj", "k_proj"].iter().enumerate() {
                tensors.push((
                    format!("{stack}.layers.{layer}.self_attn.{name}.weight"),
                    vec![d, d],
                    values(d * d, (layer * 10 + i) as u64),
                ));
            }
        }
    }
    write_bf16(&vlm.join("model.safetensors"), &tensors);
    std::fs::write(
        vlm.join("config.json"),
        r#"{"text_config": {"num_attention_heads": 4, "num_hidden_layers": 3, "hidden_size": 64},
            "vision_config": {"num_attention_heads": 2, "num_hidden_layers": 2, "hidden_size": 32}}"#,
    )
    .unwrap();
    for (stack, heads, from) in [
        (
            "model.language_model.layers",
            4,
            "text_config.num_attention_heads",
        ),
        (
            "model.vision_tower.layers",
            2,
            "vision_config.num_attention_heads",
        ),
    ] {
        let out = xtask()
            .args(["diagnose", vlm.to_str().unwrap(), "--stack", stack])
            .args(["--format", "json", "--layers", "1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains(&format!("{stack}.N: {heads} heads, config.json's {from}")),
            "{err}"
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report[0]["heads_from"], from);
        assert_eq!(report[0]["attention"]["heads"], heads);
    }
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&vlm).ok();
}

#[test]
fn no_checkpoint_diagnoses_an_initialised_stack() {
    let out = xtask()
        .args(["diagnose", "--format", "csv", "--nulls", "mp,product"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    // At initialisation the paper's MP rule flags the Fuss–Catalan tail (≈ 47 of 768) while
    // the product null flags at most a TW fluctuation.
    let count = |null: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| l.contains(&format!(",all,empirical,{null},outlier_count,")))
            .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
            .collect()
    };
    let mp = count("mp");
    let product = count("product");
    assert_eq!(mp.len(), 12);
    assert!(mp.iter().all(|&c| (35.0..=60.0).contains(&c)), "{mp:?}");
    assert!(product.iter().all(|&c| c <= 2.0), "{product:?}");
}

/// A sharded checkpoint (HF's `model.safetensors.index.json` and two shards, one layer split
/// across them) gives the same rows as the same tensors in one file, named by its index or
/// its directory.
#[test]
fn sharded_checkpoints_give_the_same_rows() {
    let dir = temp_dir("shards");
    let single = llama_checkpoint(&dir);
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let d = 64;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = (0..3)
        .flat_map(|layer| {
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(move |(i, name)| {
                    (
                        format!("model.layers.{layer}.self_attn.{name}.weight"),
                        vec![d, d],
                        values(d * d, (layer * 10 + i) as u64),
                    )
                })
        })
        .collect();
    let (first, second) = tensors.split_at(4);
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_bf16(&sharded.join(files[0]), first);
    write_bf16(&sharded.join(files[1]), second);
    let weight_map: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| (name.clone(), files[usize::from(i >= 4)].into()))
        .collect();
    let index = sharded.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    let csv = |path: &Path| diagnose_ok([path.to_str().unwrap(), "--format", "csv"]);
    let want = csv(&single);
    assert_eq!(want.lines().count(), 1 + 3 * 11);
    assert_eq!(csv(&sharded), want);
    assert_eq!(csv(&index), want);
    std::fs::remove_dir_all(&dir).ok();
}

/// A reader that goes away (`… | head`) ends the run quietly and successfully.
#[test]
fn a_closed_pipe_is_a_quiet_success() {
    let dir = temp_dir("pipe");
    let path = llama_checkpoint(&dir);
    let mut child = xtask()
        .args(["diagnose", path.to_str().unwrap(), "--format", "csv"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the first row is written: every write fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
