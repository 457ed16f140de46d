//! `bench`: the seed's question, measured. In one process, on one adapter, for the same
//! weights and tokens, times:
//! - `grouped` — the real layer: every expert in one dispatch per projection;
//! - `loop` — the seed's approach on the GPU: the same kernels dispatched once per expert
//!   (the weights split into one shard per expert, so N up and N down dispatches);
//! - `dense` — one FFN (the same kernels, one expert) over T·k tokens: the same FLOPs with
//!   no routing spread, the floor an MoE layer should approach;
//! - `copy` — a plain buffer copy of the weights the experts read, for bandwidth;
//! - `cpu` — the CPU reference (when it would take under 10 s).
//!
//! Every variant runs dropless (`drop_tokens: false`) so all do the same expert FLOPs.
//! `grouped`, `loop` and `dense` take turns run by run (a slow spell of a shared machine
//! then lands on all three rather than on one).
//! GPU times come from timestamp queries when the adapter has them; otherwise from the wall
//! time of encoding, submitting and waiting for a forward of a batch already on the device.
//!
//! cargo run --release --example bench -- [--quick] [--json FILE] [--svg FILE]
//!     [--experts 1,8,32,64,128] [--tokens 512,4096,16384] [--top-k 1,2] [--skew 1,4]
//!     [--d-model 512] [--d-ff 2048] [--runs 5]
//! cargo run --release --example bench -- --replot FILE.json --svg FILE.svg

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use switch_moe::rng::SeededRng;
use switch_moe::{
    cpu_reference, GpuContext, LayerOptions, LayerShape, MoeConfig, MoeLayer, MoeWeights,
};

const USAGE: &str = "usage: bench [--quick] [--json FILE] [--svg FILE] [--experts 1,8,32,64,128] \
                     [--tokens 512,4096,16384] [--top-k 1,2] [--skew 1,4] [--d-model 512] \
                     [--d-ff 2048] [--runs 5] | bench --replot FILE.json --svg FILE.svg";

struct Args {
    experts: Vec<usize>,
    tokens: Vec<usize>,
    top_k: Vec<usize>,
    skew: Vec<usize>,
    d_model: usize,
    d_ff: usize,
    runs: usize,
    json: Option<String>,
    svg: Option<String>,
    /// Plot the records of this JSON file instead of measuring.
    replot: Option<String>,
}

fn list(value: &str) -> Result<Vec<usize>, String> {
    value
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|e| format!("{value}: {e}"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        experts: vec![1, 8, 32, 64, 128],
        tokens: vec![512, 4096, 16384],
        top_k: vec![1, 2],
        skew: vec![1, 4],
        d_model: 512,
        d_ff: 2048,
        runs: 5,
        json: None,
        svg: None,
        replot: None,
    };
    let mut rest = std::env::args().skip(1);
    while let Some(flag) = rest.next() {
        if flag == "--quick" {
            args.experts = vec![8, 64];
            args.tokens = vec![2048];
            args.d_model = 256;
            args.d_ff = 1024;
            continue;
        }
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--experts" => args.experts = list(&value)?,
            "--tokens" => args.tokens = list(&value)?,
            "--top-k" => args.top_k = list(&value)?,
            "--skew" => args.skew = list(&value)?,
            "--d-model" => args.d_model = number()?,
            "--d-ff" => args.d_ff = number()?,
            "--runs" => args.runs = number()?.max(1),
            "--json" => args.json = Some(value),
            "--svg" => args.svg = Some(value),
            "--replot" => args.replot = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// One measured variant of one case.
struct Record {
    variant: &'static str,
    n_experts: usize,
    tokens: usize,
    top_k: usize,
    skew: usize,
    ms_median: f64,
    ms_min: f64,
    gflops: f64,
    dispatches: usize,
}

/// Median and min of `runs` timings after one warm-up, in ms.
fn time_runs(runs: usize, mut once: impl FnMut() -> f64) -> (f64, f64) {
    once();
    let times: Vec<f64> = (0..runs).map(|_| once() * 1e3).collect();
    median_and_min(times)
}

/// Median and min of `runs` timings of each of `variants` after one warm-up each, in ms.
/// The variants take turns run by run, so that a slow spell of a shared machine lands on
/// all of them rather than on one.
fn time_interleaved(runs: usize, variants: &mut [&mut dyn FnMut() -> f64]) -> Vec<(f64, f64)> {
    let mut times = vec![Vec::with_capacity(runs); variants.len()];
    for variant in variants.iter_mut() {
        variant();
    }
    for _ in 0..runs {
        for (variant, times) in variants.iter_mut().zip(&mut times) {
            times.push(variant() * 1e3);
        }
    }
    times.into_iter().map(median_and_min).collect()
}

fn median_and_min(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// Set once a forward came back without GPU timestamps: later ones skip asking for them.
static NO_TIMESTAMPS: AtomicBool = AtomicBool::new(false);
/// Which of the three ways of timing a forward were used, for the footer.
static TIMED_BY_TIMESTAMPS: AtomicBool = AtomicBool::new(false);
static TIMED_BY_SUBMIT: AtomicBool = AtomicBool::new(false);
static TIMED_BY_FORWARD: AtomicBool = AtomicBool::new(false);

/// A batch of tokens already on the device, and room for its output.
struct DeviceBatch {
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    tokens: usize,
}

fn device_batch(context: &GpuContext, x: &[f32], tokens: usize) -> DeviceBatch {
    use wgpu::util::DeviceExt;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let x = context
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench x"),
            contents: bytemuck::cast_slice(x),
            usage,
        });
    let y = context.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench y"),
        size: x.size(),
        usage,
        mapped_at_creation: false,
    });
    DeviceBatch { x, y, tokens }
}

/// Seconds of one forward: GPU timestamps around its compute pass where the driver gives
/// them; otherwise the wall time of encoding it for a batch already on the device,
/// submitting and waiting (like the copy it is compared with); for a batch the layer can
/// only run in chunks, the wall time of `forward()`, upload and read-back included.
fn time_forward(
    context: &GpuContext,
    layer: &MoeLayer,
    x: &[f32],
    shape: &[usize],
    batch: &DeviceBatch,
) -> f64 {
    if !NO_TIMESTAMPS.load(Ordering::Relaxed) {
        let (_, gpu_seconds) = layer.forward_timed(x, shape).expect("forward");
        if let Some(seconds) = gpu_seconds {
            TIMED_BY_TIMESTAMPS.store(true, Ordering::Relaxed);
            return seconds;
        }
        NO_TIMESTAMPS.store(true, Ordering::Relaxed);
    }
    let start = Instant::now();
    let mut encoder = context.device.create_command_encoder(&Default::default());
    if layer
        .encode_forward(&mut encoder, &batch.x, &batch.y, None, batch.tokens)
        .is_ok()
    {
        context.queue.submit([encoder.finish()]);
        context
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
        TIMED_BY_SUBMIT.store(true, Ordering::Relaxed);
        return start.elapsed().as_secs_f64();
    }
    let start = Instant::now();
    layer.forward(x, shape).expect("forward");
    TIMED_BY_FORWARD.store(true, Ordering::Relaxed);
    start.elapsed().as_secs_f64()
}

/// Wall seconds of copying `bytes` between two device buffers.
fn time_copy(
    context: &GpuContext,
    source: &wgpu::Buffer,
    target: &wgpu::Buffer,
    bytes: u64,
) -> f64 {
    let start = Instant::now();
    let mut encoder = context.device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(source, 0, target, 0, bytes);
    context.queue.submit([encoder.finish()]);
    context
        .device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    start.elapsed().as_secs_f64()
}

/// A router bias on expert 0 that gives it about `skew` times its share of first choices.
fn skew_router(weights: &mut MoeWeights, x: &[f32], skew: usize) {
    let n = weights.shape.num_experts;
    if skew <= 1 || n < 2 {
        return;
    }
    let target = (skew as f64 / n as f64).min(1.0);
    let d = weights.shape.d_model;
    let sample = &x[..x.len().min(512 * d)];
    let share = |weights: &MoeWeights| {
        let routing = cpu_reference::route_tokens(sample, weights, 1, false);
        routing.routes.iter().filter(|&&e| e == 0).count() as f64 / routing.routes.len() as f64
    };
    let (mut low, mut high) = (0.0f32, 30.0f32);
    for _ in 0..24 {
        let mid = 0.5 * (low + high);
        weights
            .router_bias
            .as_mut()
            .expect("random weights have biases")[0] = mid;
        if share(weights) < target {
            low = mid;
        } else {
            high = mid;
        }
    }
}

fn main() {
    env_logger::init();
    if std::env::args().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message} ({USAGE})");
            std::process::exit(2);
        }
    };
    if let Some(json) = &args.replot {
        let svg = args.svg.as_deref().unwrap_or("bench.svg");
        let (records, adapter) = read_records(json);
        std::fs::write(svg, svg_plot(&records, &adapter)).unwrap_or_else(|e| panic!("{svg}: {e}"));
        eprintln!("wrote {svg} from {json}");
        return;
    }
    let context = GpuContext::new().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    let adapter = context.adapter_summary();
    println!(
        "adapter: {adapter}; median and min of {} runs after a warm-up",
        args.runs
    );
    println!(
        "d_model {}, d_ff {}, dropless, relu FFN",
        args.d_model, args.d_ff
    );

    let (d_model, d_ff) = (args.d_model, args.d_ff);
    let mut records = Vec::new();
    let cases: Vec<(usize, usize, usize, usize)> = args
        .tokens
        .iter()
        .flat_map(|&t| args.experts.iter().map(move |&n| (t, n)))
        .flat_map(|(t, n)| {
            args.top_k
                .iter()
                .filter(move |&&k| k <= n)
                .map(move |&k| (t, n, k))
        })
        .flat_map(|(t, n, k)| {
            args.skew
                .iter()
                .filter(move |&&s| s == 1 || n >= 2 * s)
                .map(move |&s| (t, n, k, s))
        })
        .collect();
    println!(
        "\n{:>8} {:>4} {:>6} {:>2} {:>4} {:>10} {:>10} {:>9} {:>5} {:>8}",
        "variant", "N", "T", "k", "skew", "median ms", "min ms", "GFLOP/s", "disp", "/ dense"
    );
    for (index, &(tokens, n_experts, top_k, skew)) in cases.iter().enumerate() {
        eprintln!(
            "[{}/{}] N={n_experts} T={tokens} k={top_k} skew={skew}",
            index + 1,
            cases.len()
        );
        let x = SeededRng::new(tokens as u64).normal_vec(tokens * d_model);
        let shape = LayerShape {
            num_experts: n_experts,
            d_model,
            d_ff,
        };
        let mut weights = MoeWeights::random(shape, false, true, 17);
        skew_router(&mut weights, &x, skew);
        let config = MoeConfig {
            top_k,
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let flops = 2.0 * 2.0 * (tokens * top_k) as f64 * d_model as f64 * d_ff as f64;
        let mut case_records = Vec::new();
        let mut record = |variant, (ms_median, ms_min): (f64, f64), dispatches| {
            case_records.push(Record {
                variant,
                n_experts,
                tokens,
                top_k,
                skew,
                ms_median,
                ms_min,
                gflops: flops / (ms_median * 1e-3) / 1e9,
                dispatches,
            });
        };

        let grouped = MoeLayer::new(&context, config.clone(), &weights).expect("grouped layer");
        let per_expert = LayerOptions {
            max_experts_per_shard: Some(1),
            ..Default::default()
        };
        let looped = MoeLayer::with_options(&context, config.clone(), &weights, per_expert)
            .expect("loop layer");
        let dense_weights = MoeWeights::random(
            LayerShape {
                num_experts: 1,
                d_model,
                d_ff,
            },
            false,
            true,
            17,
        );
        let dense_config = MoeConfig {
            top_k: 1,
            drop_tokens: false,
            ..MoeConfig::default()
        };
        let dense = MoeLayer::new(&context, dense_config, &dense_weights).expect("dense layer");

        let xs = [tokens, d_model];
        let batch = device_batch(&context, &x, tokens);
        let dense_x = SeededRng::new(5).normal_vec(tokens * top_k * d_model);
        let dense_shape = [tokens * top_k, d_model];
        let dense_batch = device_batch(&context, &dense_x, tokens * top_k);
        // Before the timed runs, whose batches on the device take a second set of buffers.
        let output = grouped.forward(&x, &xs).expect("forward");
        let scratch_mib = grouped.scratch_bytes() as f64 / (1 << 20) as f64;
        let timings = time_interleaved(
            args.runs,
            &mut [
                &mut || time_forward(&context, &grouped, &x, &xs, &batch),
                &mut || time_forward(&context, &looped, &x, &xs, &batch),
                &mut || time_forward(&context, &dense, &dense_x, &dense_shape, &dense_batch),
            ],
        );
        record("grouped", timings[0], grouped.dispatches_per_forward());
        record("loop", timings[1], looped.dispatches_per_forward());
        record("dense", timings[2], dense.dispatches_per_forward());
        drop((grouped, looped, dense));

        // The weights the grouped layer must read: W1 and W2 of every expert that got tokens.
        let used = output.kept.iter().filter(|&&k| k > 0).count();
        let one_expert = (d_model * d_ff * 4) as u64;
        let bytes = 2 * used as u64 * one_expert;
        let buffer = |label| {
            context.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (source, target) = (buffer("copy source"), buffer("copy target"));
        let copy = time_runs(args.runs, || time_copy(&context, &source, &target, bytes));

        let cpu_estimate_s = flops / 10e9;
        if cpu_estimate_s < 10.0 {
            record(
                "cpu",
                time_runs(args.runs.min(3), || {
                    let start = Instant::now();
                    cpu_reference::forward(&config, &weights, &x, &xs).expect("cpu forward");
                    start.elapsed().as_secs_f64()
                }),
                0,
            );
        } else {
            eprintln!("  cpu skipped: about {cpu_estimate_s:.0} s per forward");
        }

        let dense_ms = case_records
            .iter()
            .find(|r| r.variant == "dense")
            .map_or(f64::NAN, |r| r.ms_median);
        for r in &case_records {
            println!(
                "{:>8} {:>4} {:>6} {:>2} {:>4} {:>10.2} {:>10.2} {:>9.1} {:>5} {:>8.2}",
                r.variant,
                r.n_experts,
                r.tokens,
                r.top_k,
                r.skew,
                r.ms_median,
                r.ms_min,
                r.gflops,
                r.dispatches,
                r.ms_median / dense_ms
            );
        }
        let grouped_ms = case_records[0].ms_median;
        println!(
            "{:>8}  weights read {:.1} MiB: copy {:.2} ms ({:.1} GB/s), grouped reads them at {:.1} GB/s; \
             {} tokens per used expert; scratch {:.1} MiB",
            "copy",
            bytes as f64 / (1 << 20) as f64,
            copy.0,
            bytes as f64 / (copy.0 * 1e-3) / 1e9,
            bytes as f64 / (grouped_ms * 1e-3) / 1e9,
            tokens * top_k / used.max(1),
            scratch_mib,
        );
        records.extend(case_records);
    }

    let methods = [
        (
            &TIMED_BY_TIMESTAMPS,
            "GPU timestamps around the forward's compute pass",
        ),
        (
            &TIMED_BY_SUBMIT,
            "the driver gave no GPU timestamps: wall time of encoding, submitting and waiting \
             for a forward of a batch already on the device (as the copy is timed)",
        ),
        (
            &TIMED_BY_FORWARD,
            "batches the layer runs in chunks: wall time of forward(), upload of x and \
             read-back included",
        ),
    ];
    for (used, method) in methods {
        if used.load(Ordering::Relaxed) {
            println!("times: {method}");
        }
    }
    if let Some(path) = &args.json {
        let list: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "variant": r.variant, "n_experts": r.n_experts, "tokens": r.tokens,
                    "d_model": d_model, "d_ff": d_ff, "top_k": r.top_k, "skew": r.skew,
                    "ms_median": r.ms_median, "ms_min": r.ms_min, "gflops": r.gflops,
                    "dispatches": r.dispatches, "adapter": adapter.name, "backend": adapter.backend,
                })
            })
            .collect();
        let json = serde_json::to_string_pretty(&list).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::fs::write(path, json).unwrap_or_else(|e| panic!("{path}: {e}"));
        eprintln!("wrote {path}");
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg_plot(&records, &adapter.name))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        eprintln!("wrote {path}");
    }
}

/// Records and adapter name from a `--json` file.
fn read_records(path: &str) -> (Vec<Record>, String) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let values: Vec<serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let number = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let variant = |name: &str| -> &'static str {
        ["grouped", "loop", "dense", "cpu"]
            .into_iter()
            .find(|v| *v == name)
            .unwrap_or("other")
    };
    let adapter = values
        .first()
        .and_then(|v| v["adapter"].as_str())
        .unwrap_or("")
        .to_string();
    let records = values
        .iter()
        .map(|v| Record {
            variant: variant(v["variant"].as_str().unwrap_or("")),
            n_experts: number(v, "n_experts") as usize,
            tokens: number(v, "tokens") as usize,
            top_k: number(v, "top_k") as usize,
            skew: number(v, "skew") as usize,
            ms_median: number(v, "ms_median"),
            ms_min: number(v, "ms_min"),
            gflops: number(v, "gflops"),
            dispatches: number(v, "dispatches") as usize,
        })
        .collect();
    (records, adapter)
}

/// Time against N (both log scale), one line per variant and token count, for top-1
/// uniform routing (or the first top-k/skew measured).
fn svg_plot(records: &[Record], adapter: &str) -> String {
    // The legend takes a column right of the plot.
    let (width, height, margin, legend) = (960.0, 460.0, 70.0, 200.0);
    let Some(first) = records.first() else {
        return String::from("<svg xmlns=\"http://www.w3.org/2000/svg\"/>");
    };
    let shown: Vec<&Record> = records
        .iter()
        .filter(|r| r.top_k == first.top_k && r.skew == first.skew && r.variant != "cpu")
        .collect();
    let log = |v: f64| v.max(1e-9).log10();
    let (n_min, n_max) = shown.iter().fold((f64::MAX, f64::MIN), |(a, b), r| {
        (
            a.min(log(r.n_experts as f64)),
            b.max(log(r.n_experts as f64)),
        )
    });
    let (t_min, t_max) = shown.iter().fold((f64::MAX, f64::MIN), |(a, b), r| {
        (a.min(log(r.ms_median)), b.max(log(r.ms_median)))
    });
    let span = |lo: f64, hi: f64| if hi - lo < 1e-9 { 1.0 } else { hi - lo };
    let px =
        |n: f64| margin + (log(n) - n_min) / span(n_min, n_max) * (width - 2.0 * margin - legend);
    let py = |ms: f64| {
        height - margin - (log(ms) - t_min) / span(t_min, t_max) * (height - 2.0 * margin)
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"24\" font-size=\"15\">Time per forward against experts (top-{}, skew {}) — {}</text>\n\
         <line x1=\"{margin}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\">experts N (log)</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\">ms per forward (log)</text>\n",
        first.top_k,
        first.skew,
        xml_escape(adapter),
        height - margin,
        width - margin - legend,
        height - margin,
        height - margin,
        (width - legend) / 2.0,
        height - 25.0,
        height / 2.0,
        height / 2.0,
    );
    let mut ns: Vec<usize> = shown.iter().map(|r| r.n_experts).collect();
    ns.sort_unstable();
    ns.dedup();
    for n in &ns {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
            px(*n as f64),
            height - margin + 16.0
        );
    }
    for ms in [t_min, (t_min + t_max) / 2.0, t_max] {
        let value = 10f64.powf(ms);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{value:.3}</text>",
            margin - 6.0,
            py(value) + 4.0
        );
    }
    let colors = [
        ("grouped", "#1f77b4"),
        ("loop", "#d62728"),
        ("dense", "#2ca02c"),
    ];
    let mut token_counts: Vec<usize> = shown.iter().map(|r| r.tokens).collect();
    token_counts.sort_unstable();
    token_counts.dedup();
    let dashes = ["", "6,3", "2,3", "8,2,2,2"];
    let mut legend_y = margin;
    for (variant, color) in colors {
        for (i, tokens) in token_counts.iter().enumerate() {
            let mut points: Vec<&&Record> = shown
                .iter()
                .filter(|r| r.variant == variant && r.tokens == *tokens)
                .collect();
            points.sort_by_key(|r| r.n_experts);
            if points.is_empty() {
                continue;
            }
            let path: Vec<String> = points
                .iter()
                .map(|r| format!("{:.1},{:.1}", px(r.n_experts as f64), py(r.ms_median)))
                .collect();
            let dash = dashes[i % dashes.len()];
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
                path.join(" ")
            );
            let _ = writeln!(
                svg,
                "<line x1=\"{}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/>\
                 <text x=\"{}\" y=\"{}\">{variant} T={tokens}</text>",
                width - legend + 10.0,
                width - legend + 40.0,
                width - legend + 46.0,
                legend_y + 4.0
            );
            legend_y += 16.0;
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
