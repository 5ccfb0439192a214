//! An exported petcam model, loaded with tract: its metadata, predictions, latency and a
//! per-node profile. The host (`petcam evaluate`, the export verification) uses this same code.
//!
//! Everything about the input (size, layout) and output (labels) comes from the model's own
//! metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::RgbImage;
use petcam_shared::metadata::{self, InputSpec};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::tract_linalg::multithread::Executor;
use tract_onnx::tract_core::transform::ModelTransform;

use sha2::Digest;

use crate::preprocess;
pub use crate::threads::Threads;
use crate::threads::{Chooser, Lane};

/// Which operators run the convolutions petcam has kernels for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// petcam's operators, put in by [`crate::rewrite`].
    #[default]
    Petcam,
    /// tract's own, to compare the two.
    Tract,
}

impl Kernels {
    /// What the programs' `PETCAM_TRACT_DEPTHWISE` asks for: `1` keeps tract's operators. Only
    /// a program reads it, and passes the answer in [`LoadOptions`].
    pub fn from_env() -> Self {
        match std::env::var_os("PETCAM_TRACT_DEPTHWISE") {
            Some(v) if !v.is_empty() && v != "0" => Self::Tract,
            _ => Self::Petcam,
        }
    }
}

/// How a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// How its inferences use the cores.
    pub threads: Threads,
    pub kernels: Kernels,
}

/// A model's short id from its SHA-256: 12 hex digits, enough to tell models apart on a
/// dashboard, short enough for every heartbeat.
pub fn model_id(sha256: &[u8; 32]) -> String {
    sha256[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a loadable ONNX model ({reason}); re-export it with `petcam train-and-export`")]
    Load { path: PathBuf, reason: String },
    #[error("{path} is not a petcam model: metadata {key} is {problem}")]
    Metadata {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
    #[error("inference failed: {0}")]
    Run(String),
}

type Plan = TypedSimplePlan;

/// A model ready to run, with what it says about itself.
#[derive(Clone)]
pub struct ExportedModel {
    pub path: PathBuf,
    pub bytes: u64,
    /// SHA-256 of the file: what telemetry and uploads identify the model by.
    pub sha256: [u8; 32],
    pub labels: Vec<String>,
    pub input: InputSpec,
    /// Every `metadata_props` entry.
    pub metadata: BTreeMap<String, String>,
    pub graph: GraphSummary,
    plan: Arc<Plan>,
    cores: Cores,
}

/// Where the plan runs (see [`Threads`]).
#[derive(Clone)]
enum Cores {
    One,
    Pool(Arc<rayon::ThreadPool>),
    Auto {
        pool: Arc<rayon::ThreadPool>,
        chooser: Arc<Mutex<Chooser>>,
    },
}

/// What the graph is made of, read from the file (before any runtime optimisation).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GraphSummary {
    /// Node count per operator type.
    pub ops: BTreeMap<String, usize>,
    /// Layers computed in integers: `QLinearConv` and `QLinearMatMul` (int8 weights, u8
    /// activations).
    pub int8_layers: usize,
    /// Float convolutions and matrix products whose weights are stored as int8
    /// (`DequantizeLinear` restores them at load).
    pub int8_weight_layers: usize,
    /// Float convolutions and matrix products with float weights.
    pub float_weight_layers: usize,
    /// ONNX node name to what it computes (`depthwise conv 3x3`, `1x1 conv`, `Add`, ...), to
    /// attribute tract's per-node times to layer kinds.
    #[serde(skip)]
    pub kinds: BTreeMap<String, String>,
}

impl GraphSummary {
    fn of(graph: &tract_onnx::pb::GraphProto) -> Self {
        let dequantized: std::collections::HashSet<&str> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let mut s = Self::default();
        let mut producer_kind: BTreeMap<&str, String> = BTreeMap::new();
        for n in &graph.node {
            let kind = match n.op_type.as_str() {
                "Conv" | "QLinearConv" => conv_kind(n),
                // tract fuses a conv's clip into it and names the result after the clip.
                "Clip" => n
                    .input
                    .first()
                    .and_then(|i| producer_kind.get(i.as_str()).cloned())
                    .unwrap_or_else(|| n.op_type.clone()),
                "Gemm" | "MatMul" | "QLinearMatMul" => "classifier".into(),
                _ => n.op_type.clone(),
            };
            for o in &n.output {
                producer_kind.insert(o, kind.clone());
            }
            s.kinds.insert(n.name.clone(), kind);
            *s.ops.entry(n.op_type.clone()).or_default() += 1;
            match n.op_type.as_str() {
                "QLinearConv" | "QLinearMatMul" => s.int8_layers += 1,
                "Conv" | "Gemm" | "MatMul" => match n.input.get(1) {
                    Some(w) if dequantized.contains(w.as_str()) => s.int8_weight_layers += 1,
                    _ => s.float_weight_layers += 1,
                },
                _ => {}
            }
        }
        s
    }
}

fn conv_kind(n: &tract_onnx::pb::NodeProto) -> String {
    let attr = |name: &str| n.attribute.iter().find(|a| a.name == name);
    let group = attr("group").map_or(1, |a| a.i);
    let k: Vec<String> = attr("kernel_shape")
        .map(|a| a.ints.iter().map(|i| i.to_string()).collect())
        .unwrap_or_default();
    let k = k.join("x");
    match (group > 1, k.as_str()) {
        (true, _) => format!("depthwise conv {k}"),
        (false, "1x1") => "1x1 conv".into(),
        _ => format!("conv {k}"),
    }
}

/// Mean time per layer kind (see [`GraphSummary::kinds`]), largest first: tract's node names
/// start with the ONNX node they came from.
pub fn time_by_layer_kind(profile: &[NodeTime], graph: &GraphSummary) -> Vec<OpTime> {
    let kinds: Vec<NodeTime> = profile
        .iter()
        .map(|n| {
            let source = n.name.split('.').next().unwrap_or(&n.name);
            NodeTime {
                op: graph
                    .kinds
                    .get(source)
                    .cloned()
                    .unwrap_or_else(|| "other".into()),
                ..n.clone()
            }
        })
        .collect();
    time_by_op(&kinds)
}

impl std::fmt::Debug for ExportedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedModel")
            .field("path", &self.path)
            .field("labels", &self.labels)
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

impl ExportedModel {
    /// Loads and optimises a model that runs each inference on the calling thread.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::load_with_threads(path, Threads::One)
    }

    /// Loads and optimises a model whose inferences use the cores as `threads` says.
    pub fn load_with_threads(path: &Path, threads: Threads) -> Result<Self, ModelError> {
        Self::load_with(
            path,
            LoadOptions {
                threads,
                ..LoadOptions::default()
            },
        )
    }

    /// Loads and optimises a model as `options` say.
    pub fn load_with(path: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        let data = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes_with(&data, path, options)
    }

    /// A single-thread model from the bytes of an ONNX file; `path` names it in errors.
    pub fn from_bytes(data: &[u8], path: &Path) -> Result<Self, ModelError> {
        Self::from_bytes_with_threads(data, path, Threads::One)
    }

    /// A model from the bytes of an ONNX file, its inferences on the cores as `threads` says.
    pub fn from_bytes_with_threads(
        data: &[u8],
        path: &Path,
        threads: Threads,
    ) -> Result<Self, ModelError> {
        let options = LoadOptions {
            threads,
            ..LoadOptions::default()
        };
        Self::from_bytes_with(data, path, options)
    }

    /// A model from the bytes of an ONNX file, loaded as `options` say; `path` names it in
    /// errors.
    pub fn from_bytes_with(
        data: &[u8],
        path: &Path,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let threads = options.threads;
        let load_err = |e: anyhow::Error| ModelError::Load {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        };
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &data[..])
            .map_err(load_err)?;
        let metadata: BTreeMap<String, String> = proto
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let meta_err = |key, problem: String| ModelError::Metadata {
            path: path.to_owned(),
            key,
            problem,
        };
        let json = |key: &'static str| -> Result<&str, ModelError> {
            metadata
                .get(key)
                .map(String::as_str)
                .ok_or_else(|| meta_err(key, "missing".into()))
        };
        let labels: Vec<String> = serde_json::from_str(json(metadata::LABELS)?)
            .map_err(|e| meta_err(metadata::LABELS, format!("not a JSON list of names ({e})")))?;
        let input: InputSpec = serde_json::from_str(json(metadata::INPUT)?)
            .map_err(|e| meta_err(metadata::INPUT, format!("malformed ({e})")))?;
        let graph = proto
            .graph
            .as_ref()
            .map(GraphSummary::of)
            .unwrap_or_default();
        avoid_amx_int8();
        if threads.max() > 1 {
            prefer_one_chunk_per_thread();
        }
        let plan = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .and_then(|mut m| {
                if options.kernels == Kernels::Petcam {
                    let rewrite = crate::rewrite::Rewrite {
                        threads: threads.max(),
                    };
                    rewrite.transform(&mut m)?;
                }
                m.into_optimized()
            })
            // No executor in the plan: `run` picks one per inference.
            .and_then(|m| m.into_runnable())
            .map_err(load_err)?;
        let pool = || match Executor::multithread(threads.max()) {
            Executor::MultiThread(pool) => Ok(pool),
            _ => Err(ModelError::Load {
                path: path.to_owned(),
                reason: format!("no pool of {} threads on this platform", threads.max()),
            }),
        };
        let cores = match threads {
            Threads::One => Cores::One,
            Threads::Pool(_) => Cores::Pool(pool()?),
            Threads::Auto(_) => Cores::Auto {
                pool: pool()?,
                chooser: Default::default(),
            },
        };
        Ok(Self {
            path: path.to_owned(),
            bytes: data.len() as u64,
            sha256: sha2::Sha256::digest(data).into(),
            labels,
            input,
            metadata,
            graph,
            plan,
            cores,
        })
    }

    /// The model's short id: the first 12 hex digits of its SHA-256, as telemetry reports it.
    pub fn id(&self) -> String {
        model_id(&self.sha256)
    }

    /// Class probabilities for an RGB image already resized to the model's input.
    pub fn predict(&self, rgb: &RgbImage) -> Result<Vec<f32>, ModelError> {
        let out = self.run(self.input_tensor(rgb)?).map_err(run_err)?;
        let probs = out[0].to_plain_array_view::<f32>().map_err(run_err)?;
        Ok(probs.iter().copied().collect())
    }

    /// Inferences so far on one thread and on the pool, when the model chooses between them
    /// ([`Threads::Auto`]).
    pub fn lane_counts(&self) -> Option<(u64, u64)> {
        match &self.cores {
            Cores::Auto { chooser, .. } => Some(lock(chooser).counts),
            _ => None,
        }
    }

    /// Runs the plan on the calling thread or on tract's pool (see [`in_pool`]); with
    /// [`Threads::Auto`], on whichever the chooser picks, timed for it.
    fn run(&self, input: TValue) -> TractResult<TVec<TValue>> {
        self.on_cores(|| self.plan.run(tvec!(input)))
    }

    /// Runs `f` (one inference) where the model's [`Threads`] say.
    fn on_cores<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.cores {
            Cores::One => f(),
            Cores::Pool(pool) => in_pool(pool, f),
            Cores::Auto { pool, chooser } => {
                let lane = lock(chooser).choose();
                let start = std::time::Instant::now();
                let out = match lane {
                    Lane::One => f(),
                    Lane::Pool => in_pool(pool, f),
                };
                lock(chooser).record(lane, start.elapsed().as_secs_f64() * 1000.0);
                out
            }
        }
    }

    fn input_tensor(&self, rgb: &RgbImage) -> Result<TValue, ModelError> {
        let (w, h) = (self.input.width, self.input.height);
        if rgb.dimensions() != (w, h) {
            return Err(ModelError::Run(format!(
                "image is {}x{}, the model takes {w}x{h}",
                rgb.width(),
                rgb.height()
            )));
        }
        let input = tract_ndarray::Array4::from_shape_vec(
            (1, h as usize, w as usize, 3),
            rgb.as_raw().clone(),
        )
        .map_err(|e| ModelError::Run(e.to_string()))?;
        Ok(Tensor::from(input).into_tvalue())
    }

    /// Runs `rgb` through the optimised plan `runs` times, timing every node; returns the
    /// mean time of each node in plan order (tract's own node names and operator names, after
    /// its optimisation, so they show what actually ran).
    pub fn profile(&self, rgb: &RgbImage, runs: usize) -> Result<Vec<NodeTime>, ModelError> {
        let input = self.input_tensor(rgb)?;
        let mut totals: Vec<(usize, String, String, std::time::Duration)> = Vec::new();
        let mut state = TypedSimpleState::new(&self.plan).map_err(run_err)?;
        let mut body = || -> Result<(), ModelError> {
            for _ in 0..runs.max(1) {
                let mut i = 0;
                state
                    .run_plan_with_eval(tvec!(input.clone()), |ctx, op_state, node, inputs| {
                        let start = std::time::Instant::now();
                        let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                        let took = start.elapsed();
                        if totals.len() <= i {
                            totals.push((
                                node.id,
                                node.name.clone(),
                                node.op().name().to_string(),
                                took,
                            ));
                        } else {
                            totals[i].3 += took;
                        }
                        i += 1;
                        out
                    })
                    .map_err(run_err)?;
            }
            Ok(())
        };
        // As `run` does, so the profile shows the plan as it runs.
        match &self.cores {
            Cores::One => body()?,
            Cores::Pool(pool) | Cores::Auto { pool, .. } => in_pool(pool, body)?,
        }
        let n = runs.max(1) as f64;
        Ok(totals
            .into_iter()
            .map(|(id, name, op, t)| NodeTime {
                id,
                name,
                op,
                ms: t.as_secs_f64() * 1000.0 / n,
            })
            .collect())
    }

    /// Decodes a photo, resizes it with the shared routine and predicts.
    pub fn predict_file(&self, path: &Path) -> Result<Vec<f32>, PredictFileError> {
        let img = preprocess::load_input(path, self.input.width, self.input.height)?;
        Ok(self.predict(&img)?)
    }
}

fn run_err(e: anyhow::Error) -> ModelError {
    ModelError::Run(format!("{e:#}"))
}

/// Keeps tract off its AMX int8 matrix kernel (`avx512amx_mmm_i32_8x8`, x86-64 with AMX).
///
/// In tract 0.23.9 that kernel now and then reads outside its packed operand: the int8 export
/// test died with SIGSEGV at the kernel's `tileloadd` in 1 of 8 runs under a debugger on this
/// project's Sapphire Rapids build machine, and once in CI. Without it, int8 products run on
/// the AVX-512 VNNI kernels. Must run before tract first probes the CPU (it caches the result);
/// a `TRACT_CPU_ISA` set in the environment is left alone.
fn avoid_amx_int8() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("TRACT_CPU_ISA").is_none() {
        tract_onnx::tract_core::tract_linalg::knobs::TRACT_CPU_ISA.set(Some("-amx-int8".into()));
    }
}

/// Asks tract to split each matrix product in one chunk per thread rather than four.
///
/// With four, rayon hands chunks to whichever thread is free, so from one layer to the next a
/// core gets another part of the image than the one it just computed, and most activations
/// cross from one core's cache to the other's: measured on a 2-core machine, that cost a third
/// of the second core's time. With one, the thread running the plan always gets the first
/// part and the other the second, as the depthwise layers split their rows. A value set in the
/// environment (`TRACT_MMM_CHUNKS_PER_THREAD`) is left alone.
fn prefer_one_chunk_per_thread() {
    let knob = &tract_onnx::tract_core::tract_linalg::knobs::TRACT_MMM_CHUNKS_PER_THREAD;
    if std::env::var_os("TRACT_MMM_CHUNKS_PER_THREAD").is_none() {
        knob.set(Some(1));
    }
}

/// Runs `f` (one inference) on a thread of `pool`, with the pool's other threads kept awake
/// until it returns.
///
/// A plan is a chain of a hundred short operators, each split over the pool. Left to itself,
/// a rayon worker goes to sleep within microseconds of running out of work, and waking it
/// again costs tens of microseconds on a virtual machine, every operator, on the critical
/// path: measured on a 2-core machine, that held 2 threads to 1.15x the speed of one. So the
/// other workers spin on `rayon::yield_now`, which also steals and runs the split halves of
/// each operator as soon as they appear. They stop when the inference does; between frames
/// they sleep as usual.
fn in_pool<R: Send>(pool: &Arc<rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tract_onnx::tract_core::tract_linalg::multithread::multithread_tract_scope;
    pool.install(|| {
        let done = AtomicBool::new(false);
        let here = rayon::current_thread_index();
        rayon::scope(|s| {
            for _ in 1..rayon::current_num_threads() {
                s.spawn(|_| {
                    // A spinner picked up by the inference's own thread (while it waits for
                    // a stolen half) must not spin: nothing else would stop it.
                    if rayon::current_thread_index() == here {
                        return;
                    }
                    while !done.load(Ordering::Acquire) {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
            // Stops the spinners even when `f` panics.
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _stop = Stop(&done);
            multithread_tract_scope(Executor::MultiThread(pool.clone()), f)
        })
    })
}

/// The chooser's state; a panic in another inference leaves it usable.
fn lock(chooser: &Mutex<Chooser>) -> std::sync::MutexGuard<'_, Chooser> {
    chooser.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mean time of one node of the optimised plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeTime {
    pub id: usize,
    pub name: String,
    pub op: String,
    pub ms: f64,
}

/// Single-thread inference times of one model, from [`latency`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub runs: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    #[serde(default)]
    pub p99_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// Percentiles (nearest rank) and mean of times in milliseconds.
    pub fn from_samples(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self {
                runs: 0,
                p50_ms: f64::NAN,
                p90_ms: f64::NAN,
                p99_ms: f64::NAN,
                mean_ms: f64::NAN,
            };
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| percentile(&ms, q).unwrap_or(f64::NAN);
        Self {
            runs: ms.len(),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        }
    }
}

/// The `q` quantile (0..=1) of `sorted` samples: the nearest rank, no interpolation.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last as f64 * q).round() as usize])
}

/// Times `runs` inferences of each model on `rgb`, on the calling thread. The models take
/// turns run by run, so a slow spell of a shared machine hits all of them alike and their
/// ratio holds. One untimed warm-up run each comes first.
pub fn latency(
    models: &[&ExportedModel],
    rgb: &RgbImage,
    runs: usize,
) -> Result<Vec<Latency>, ModelError> {
    let runs = runs.max(1);
    let inputs = models
        .iter()
        .map(|m| m.input_tensor(rgb))
        .collect::<Result<Vec<_>, _>>()?;
    let mut times = vec![Vec::with_capacity(runs); models.len()];
    for round in 0..=runs {
        for ((m, input), t) in models.iter().zip(&inputs).zip(&mut times) {
            let start = std::time::Instant::now();
            m.run(input.clone()).map_err(run_err)?;
            if round > 0 {
                t.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    Ok(times.into_iter().map(Latency::from_samples).collect())
}

/// Like [`latency`], but each model's turn is `turn` inferences after an untimed one: a model
/// on a pool then runs as it would alone, its weights in the caches and its threads awake,
/// while the turns still spread the machine's drift over all the models. Turns are 0.2 s
/// apart: a pool's threads yield the core 32 times before they sleep, and on a busy core
/// that takes tens of milliseconds of the next turn otherwise.
pub fn latency_in_turns(
    models: &[&ExportedModel],
    rgb: &RgbImage,
    runs: usize,
    turn: usize,
) -> Result<Vec<Latency>, ModelError> {
    let (runs, turn) = (runs.max(1), turn.clamp(1, runs.max(1)));
    let inputs = models
        .iter()
        .map(|m| m.input_tensor(rgb))
        .collect::<Result<Vec<_>, _>>()?;
    let mut times = vec![Vec::with_capacity(runs); models.len()];
    while times[0].len() < runs {
        for ((m, input), t) in models.iter().zip(&inputs).zip(&mut times) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let timed = turn.min(runs - t.len());
            for i in 0..=timed {
                let start = std::time::Instant::now();
                m.run(input.clone()).map_err(run_err)?;
                if i > 0 {
                    t.push(start.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
    }
    Ok(times.into_iter().map(Latency::from_samples).collect())
}

/// Mean time per operator type over a profile, largest first: where the time goes.
pub fn time_by_op(profile: &[NodeTime]) -> Vec<OpTime> {
    let mut by: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for n in profile {
        let e = by.entry(n.op.as_str()).or_default();
        e.0 += 1;
        e.1 += n.ms;
    }
    let total: f64 = profile.iter().map(|n| n.ms).sum();
    let mut v: Vec<OpTime> = by
        .into_iter()
        .map(|(op, (nodes, ms))| OpTime {
            op: op.to_owned(),
            nodes,
            ms,
            share: if total > 0.0 { ms / total } else { 0.0 },
        })
        .collect();
    v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    v
}

/// Time spent in one operator type of the optimised plan (or one layer kind).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpTime {
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
    /// Fraction of the whole run, 0..=1.
    pub share: f64,
}

/// The result of running the model's stored golden input through it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SelfTest {
    pub passed: bool,
    pub max_abs_diff: f32,
    pub tolerance: f32,
    pub expected: Vec<f32>,
    pub got: Vec<f32>,
}

impl ExportedModel {
    /// The golden pair stored in `petcam.golden`: input image and expected output.
    pub fn golden(&self) -> Result<(RgbImage, metadata::Golden), ModelError> {
        use base64::Engine;
        let meta_err = |problem: String| ModelError::Metadata {
            path: self.path.clone(),
            key: metadata::GOLDEN,
            problem,
        };
        let golden: metadata::Golden = self
            .metadata
            .get(metadata::GOLDEN)
            .ok_or_else(|| meta_err("missing".into()))
            .and_then(|j| {
                serde_json::from_str(j).map_err(|e| meta_err(format!("malformed ({e})")))
            })?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(&golden.input_png_base64)
            .map_err(|e| meta_err(format!("input is not base64 ({e})")))?;
        let img = image::load_from_memory(&png)
            .map_err(|e| meta_err(format!("input is not a PNG ({e})")))?
            .into_rgb8();
        Ok((img, golden))
    }

    /// Runs the golden input stored in `petcam.golden` and compares with the stored output.
    pub fn self_test(&self) -> Result<SelfTest, ModelError> {
        let (img, golden) = self.golden()?;
        let got = self.predict(&img)?;
        let max_abs_diff = if got.len() == golden.probabilities.len() {
            got.iter()
                .zip(&golden.probabilities)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        } else {
            f32::INFINITY
        };
        Ok(SelfTest {
            passed: max_abs_diff <= golden.tolerance,
            max_abs_diff,
            tolerance: golden.tolerance,
            expected: golden.probabilities,
            got,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PredictFileError {
    #[error(transparent)]
    Photo(#[from] preprocess::PhotoError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Index and value of the largest probability.
pub fn top1(probs: &[f32]) -> (usize, f32) {
    probs
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0))
}
