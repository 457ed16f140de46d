//! Every shader, with no GPU: it parses and validates with naga under the capabilities the
//! layer asks the device for (none beyond core WebGPU), translates to SPIR-V, MSL, HLSL and
//! GLSL (compute), and agrees with the host on its `Params` size, constants and workgroup size.

use std::collections::BTreeMap;

use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use switch_moe::gpu::params::{
    AssignParams, BackwardParams, CombineParams, ExpertParams, OptimizerParams, RefreshParams,
    RouteParams, StatsParams,
};
use switch_moe::gpu::shaders::{self, ShaderSource};
use switch_moe::WeightFormat;

/// The forward's kernels and those of training.
fn every_shader() -> impl Iterator<Item = ShaderSource> {
    shaders::ALL.into_iter().chain(shaders::TRAINING)
}

fn parse_and_validate(shader: ShaderSource) -> (naga::Module, ModuleInfo) {
    let module = naga::front::wgsl::parse_str(shader.source)
        .unwrap_or_else(|e| panic!("{}: {}", shader.name, e.emit_to_string(shader.source)));
    // The layer requests no shader features: validate with none.
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", shader.name, e.emit_to_string(shader.source)));
    (module, info)
}

/// The value of a module-scope `const` that is a plain literal.
fn constant(module: &naga::Module, name: &str) -> Option<u64> {
    let (_, c) = module
        .constants
        .iter()
        .find(|(_, c)| c.name.as_deref() == Some(name))?;
    match module.global_expressions[c.init] {
        naga::Expression::Literal(naga::Literal::U32(v)) => Some(v as u64),
        naga::Expression::Literal(naga::Literal::I32(v)) => Some(v as u64),
        naga::Expression::Literal(naga::Literal::AbstractInt(v)) => Some(v as u64),
        ref other => panic!("const {name} is not a literal: {other:?}"),
    }
}

/// Byte size of the type of the global variable `params`.
fn params_size(module: &naga::Module) -> u32 {
    let (_, var) = module
        .global_variables
        .iter()
        .find(|(_, v)| v.name.as_deref() == Some("params"))
        .expect("no `params` global");
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    layouter[var.ty].size
}

#[test]
fn every_shader_parses_and_validates() {
    for shader in every_shader() {
        let (module, _) = parse_and_validate(shader);
        assert_eq!(
            module.entry_points.len(),
            1,
            "{}: one kernel per file",
            shader.name
        );
        assert_eq!(module.entry_points[0].name, "main", "{}", shader.name);
    }
}

#[test]
fn params_structs_match_their_rust_mirrors() {
    let expected: BTreeMap<&str, usize> = [
        ("stage_tokens", size_of::<RouteParams>()),
        ("route_tokens", size_of::<RouteParams>()),
        ("count_experts", size_of::<AssignParams>()),
        ("scan_expert_offsets", size_of::<AssignParams>()),
        ("scatter_assignments", size_of::<AssignParams>()),
        ("expert_up", size_of::<ExpertParams>()),
        ("expert_down", size_of::<ExpertParams>()),
        ("combine_outputs", size_of::<CombineParams>()),
        ("reduce_router_stats", size_of::<StatsParams>()),
        ("gate_backward", size_of::<BackwardParams>()),
        ("gate_input_backward", size_of::<BackwardParams>()),
        ("expert_hidden_backward", size_of::<BackwardParams>()),
        ("expert_down_backward", size_of::<BackwardParams>()),
        ("expert_up_backward", size_of::<BackwardParams>()),
        ("expert_input_backward", size_of::<BackwardParams>()),
        ("expert_bias_backward", size_of::<BackwardParams>()),
        ("router_backward", size_of::<BackwardParams>()),
        ("combine_backward", size_of::<BackwardParams>()),
        ("optimizer_step", size_of::<OptimizerParams>()),
        ("refresh_expert_weights", size_of::<RefreshParams>()),
        ("refresh_router_weights", size_of::<RefreshParams>()),
    ]
    .into();
    for shader in every_shader() {
        let (module, _) = parse_and_validate(shader);
        let rust = expected[shader.name];
        assert_eq!(
            params_size(&module) as usize,
            rust,
            "{}: WGSL Params vs Rust",
            shader.name
        );
        assert_eq!(rust % 16, 0, "{}: Params padded to 16 bytes", shader.name);
    }
}

#[test]
fn shared_constants_and_workgroup_sizes_agree_with_the_host() {
    let host: BTreeMap<&str, u64> = [
        ("BLOCK_TOKENS", shaders::BLOCK_TOKENS as u64),
        ("MAX_EXPERTS", shaders::MAX_EXPERTS as u64),
        ("DROPPED", shaders::DROPPED as u64),
    ]
    .into();
    let workgroup: BTreeMap<&str, u32> = [
        ("stage_tokens", shaders::BLOCK_TOKENS),
        ("route_tokens", shaders::BLOCK_TOKENS),
        ("count_experts", shaders::BLOCK_TOKENS),
        ("scatter_assignments", shaders::BLOCK_TOKENS),
        ("scan_expert_offsets", shaders::REDUCE_WORKGROUP),
        ("reduce_router_stats", shaders::REDUCE_WORKGROUP),
        ("combine_outputs", shaders::COMBINE_WORKGROUP),
        // The matmuls' default LANES (an override); the layer sets it per block.
        ("expert_up", shaders::MATMUL_LANES[0]),
        ("expert_down", shaders::MATMUL_LANES[0]),
    ]
    .into_iter()
    .chain(shaders::TRAINING.map(|s| {
        let lanes = if MATMUL_KERNELS.contains(&s.name) {
            shaders::MATMUL_LANES[0]
        } else {
            shaders::TRAINING_WORKGROUP
        };
        (s.name, lanes)
    }))
    .collect();
    let mut seen = 0;
    for shader in every_shader() {
        let (module, info) = parse_and_validate(shader);
        // Workgroup sizes set by overrides resolve to their defaults here.
        let entry = Some((naga::ShaderStage::Compute, "main"));
        let (module, _) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            entry,
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{}: overrides: {e}", shader.name));
        for (name, value) in &host {
            if let Some(wgsl) = constant(&module, name) {
                assert_eq!(wgsl, *value, "{}: const {name}", shader.name);
                seen += 1;
            }
        }
        let size = module.entry_points[0].workgroup_size;
        assert_eq!(
            size[0] * size[1] * size[2],
            workgroup[shader.name],
            "{}: workgroup size",
            shader.name
        );
    }
    assert!(
        seen >= 6,
        "expected the shared constants in the shaders, found {seen}"
    );
}

/// The backward's kernels built on the matmul core (their workgroup is `LANES`).
const MATMUL_KERNELS: [&str; 6] = [
    "expert_hidden_backward",
    "expert_down_backward",
    "expert_up_backward",
    "expert_input_backward",
    "router_backward",
    "combine_backward",
];

/// The overrides of one matmul tile shape.
fn tiling_constants((row_lanes, rows, block): (u32, u32, u32)) -> naga::back::PipelineConstants {
    let mut constants = naga::back::PipelineConstants::default();
    constants.insert("ROW_LANES".to_string(), row_lanes as f64);
    constants.insert("QUADS".to_string(), (block / 4) as f64);
    constants.insert("ROW_QUADS".to_string(), (rows / 4) as f64);
    constants.insert("LANES".to_string(), lanes(block));
    constants
}

/// Every specialization the layer builds: the matmuls for each tile shape (row lanes, block
/// rows and side), expert_up for each activation, gated or not, keeping its
/// pre-activations or not, and expert_hidden_backward for each activation.
fn specializations(shader: ShaderSource) -> Vec<naga::back::PipelineConstants> {
    let mut all = Vec::new();
    match shader.name {
        "expert_up" => {
            for tiling in tilings() {
                for activation in 0..7 {
                    for (gated, keep) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)] {
                        let mut constants = tiling_constants(tiling);
                        constants.insert("ACTIVATION".to_string(), activation as f64);
                        constants.insert("GATED".to_string(), gated);
                        constants.insert("KEEP_PRE_ACTIVATIONS".to_string(), keep);
                        all.push(constants);
                    }
                }
            }
        }
        "expert_hidden_backward" => {
            for tiling in tilings() {
                for activation in 0..7 {
                    let mut constants = tiling_constants(tiling);
                    constants.insert("ACTIVATION".to_string(), activation as f64);
                    all.push(constants);
                }
            }
        }
        name if name == "expert_down" || MATMUL_KERNELS.contains(&name) => {
            all.extend(tilings().map(tiling_constants));
        }
        _ => all.push(Default::default()),
    }
    // Every stored weight format (its code), once per kernel.
    let format_keys: &[&str] = match shader.name {
        "expert_up" => &["W1_FORMAT", "W3_FORMAT"],
        "expert_down" => &["W2_FORMAT"],
        _ => &[],
    };
    for format in WeightFormat::ALL {
        if format_keys.is_empty() {
            break;
        }
        let mut constants = naga::back::PipelineConstants::default();
        for key in format_keys {
            constants.insert(key.to_string(), format.shader_code() as f64);
        }
        all.push(constants);
    }
    all
}

/// The matmuls' LANES for a block side.
fn lanes(block: u32) -> f64 {
    let index = shaders::MATMUL_BLOCKS.iter().position(|&b| b == block);
    shaders::MATMUL_LANES[index.expect("a block of MATMUL_BLOCKS")] as f64
}

/// Every (ROW_LANES, block rows, block side) the matmuls are built for.
fn tilings() -> impl Iterator<Item = (u32, u32, u32)> {
    shaders::ROW_LANES_CHOICES.into_iter().flat_map(|lanes| {
        shaders::MATMUL_BLOCKS.into_iter().flat_map(move |block| {
            shaders::MATMUL_BLOCK_ROWS
                .into_iter()
                .filter(move |&rows| rows <= block)
                .map(move |rows| (lanes, rows, block))
        })
    })
}

#[test]
fn every_shader_translates_to_spirv_msl_hlsl_and_glsl() {
    for shader in every_shader() {
        let (module, info) = parse_and_validate(shader);
        for constants in specializations(shader) {
            let entry = Some((naga::ShaderStage::Compute, "main"));
            let (module, info) = naga::back::pipeline_constants::process_overrides(
                &module, &info, entry, &constants,
            )
            .unwrap_or_else(|e| panic!("{}: overrides: {e}", shader.name));
            let what = format!("{} {:?}", shader.name, constants);

            naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e}"));

            let msl_pipeline = naga::back::msl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, "main".to_string())),
                ..Default::default()
            };
            naga::back::msl::write_string(
                &module,
                &info,
                &naga::back::msl::Options::default(),
                &msl_pipeline,
            )
            .unwrap_or_else(|e| panic!("{what}: MSL: {e}"));

            let hlsl_options = naga::back::hlsl::Options::default();
            let hlsl_pipeline = naga::back::hlsl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, "main".to_string())),
            };
            let mut hlsl = String::new();
            naga::back::hlsl::Writer::new(&mut hlsl, &hlsl_options, &hlsl_pipeline)
                .write(&module, &info, None)
                .unwrap_or_else(|e| panic!("{what}: HLSL: {e}"));

            let glsl_options = naga::back::glsl::Options {
                version: naga::back::glsl::Version::Embedded {
                    version: 310,
                    is_webgl: false,
                },
                ..Default::default()
            };
            let glsl_pipeline = naga::back::glsl::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: "main".to_string(),
                multiview: None,
            };
            let mut glsl = String::new();
            naga::back::glsl::Writer::new(
                &mut glsl,
                &module,
                &info,
                &glsl_options,
                &glsl_pipeline,
                naga::proc::BoundsCheckPolicies::default(),
            )
            .and_then(|mut writer| writer.write())
            .unwrap_or_else(|e| panic!("{what}: GLSL: {e}"));
        }
    }
}
